"""Tiny Qwen3 / Qwen3-MoE models split by TP, PP, EP and their products equal TP=1/PP=1 (fp32, 4 ranks).

One launch does everything: build the model at TP=1/PP=1 (every rank a data-parallel replica), record
its logits and gradients, save it with dist_checkpointing, then for each layout re-initialise the
parallel state, build the model without initialisation, load the checkpoint, and compare.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.megatron_utils import TINY_QWEN3, TINY_QWEN3_MOE, forward_logits, tiny_arch

DENSE_LAYOUTS = [(2, 1, 1), (1, 2, 1), (2, 2, 1)]  # (tp, pp, ep)
MOE_LAYOUTS = DENSE_LAYOUTS + [(1, 1, 2), (2, 1, 2), (1, 2, 2)]


def _grad_of(model, name: str):
    for param_name, param in model.named_parameters():
        if param_name == name:
            return None if param.grad is None else param.grad.detach().clone()
    return None


def _equivalence_body(rank: int, world_size: int, ckpt_dir: str, hf: dict, layouts: list) -> dict:
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_gopd import platform
    from megatron_gopd.models import ParallelLayout, build_gpt_model

    arch = tiny_arch(hf)
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, arch.vocab_size, (2, 16), generator=generator)
    norm = "decoder.final_layernorm.weight"

    platform.init_model_parallel(tp=1, pp=1, seed=11)
    reference = build_gpt_model(arch, ParallelLayout())
    ref_logits, ref_loss = forward_logits(reference, tokens, arch.vocab_size, with_backward=True)
    ref_grad = _grad_of(reference, norm)
    if rank == 0:
        os.makedirs(ckpt_dir)
    torch.distributed.barrier()
    dist_checkpointing.save(reference.sharded_state_dict(), ckpt_dir)
    torch.distributed.barrier()

    report = {}
    for tp, pp, ep in layouts:
        platform.init_model_parallel(tp=tp, pp=pp, ep=ep, seed=99)  # weights must come from the ckpt
        layout = ParallelLayout(tp=tp, pp=pp, ep=ep)
        model = build_gpt_model(arch, layout, perform_initialization=False)
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
        logits, loss = forward_logits(model, tokens, arch.vocab_size, with_backward=True)
        if parallel_state.is_pipeline_last_stage():
            grad = _grad_of(model, norm)
            report[f"tp{tp}pp{pp}ep{ep}"] = dict(
                logit_diff=(logits - ref_logits).abs().max().item(),
                loss_diff=abs(loss - ref_loss),
                grad_diff=(grad - ref_grad).abs().max().item(),
            )
    return report


@pytest.mark.slow
@pytest.mark.parametrize(
    "hf, layouts", [(TINY_QWEN3, DENSE_LAYOUTS), (TINY_QWEN3_MOE, MOE_LAYOUTS)], ids=["qwen3", "qwen3_moe"]
)
def test_parallel_logits_and_grads_match_single_rank(tmp_path, hf, layouts):
    reports = run_distributed(_equivalence_body, world_size=4, ckpt_dir=str(tmp_path / "ckpt"), hf=hf, layouts=layouts)
    seen = set()
    for rank_report in reports:
        for layout, numbers in rank_report.items():
            seen.add(layout)
            assert numbers["logit_diff"] < 1e-5, (layout, numbers)
            assert numbers["loss_diff"] < 1e-6, (layout, numbers)
            assert numbers["grad_diff"] < 1e-6, (layout, numbers)
    assert seen == {f"tp{tp}pp{pp}ep{ep}" for tp, pp, ep in layouts}
