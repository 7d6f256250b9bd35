"""The smallest real thing megatron-gopd does today: one tiny Qwen3, split two ways, same logits.

Run with ``torchrun --nproc-per-node 2 examples/toy/parallel_smoke.py`` (``make demo`` does). It builds
a tiny random Qwen3 from a Hugging Face config, runs it at TP=1 on every rank, saves it with Megatron's
dist_checkpointing, reloads it at TP=2 (and PP=2), and checks that forward logits and a backward pass
agree. The full G-OPD demo (teacher, OPD vs ExOPD, results table) replaces this script once the
trainer lands.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch

from megatron_gopd import platform
from megatron_gopd.log import setup_logging
from megatron_gopd.models import ModelArchitecture, ParallelLayout, build_gpt_model

logger = logging.getLogger("megatron_gopd.demo")

TINY_QWEN3 = dict(
    architectures=["Qwen3ForCausalLM"],
    model_type="qwen3",
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=1000,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    tie_word_embeddings=True,
)


def logits_of(model, tokens: torch.Tensor, vocab_size: int):
    """Full-vocabulary logits on the last pipeline stage (None elsewhere), through Megatron's schedule."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    out = {}

    def loss_func(logits):
        full = gather_from_tensor_model_parallel_region(logits)[..., :vocab_size]  # [b, s, V]
        out["logits"] = full.detach()
        loss = -full.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None]).mean()
        return loss, {"loss": loss.detach()}

    get_forward_backward_func()(
        forward_step_func=lambda _it, m: (m(tokens, positions, None), loss_func),
        data_iterator=iter([None]),
        model=[model],
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=False,
    )
    return out.get("logits") if parallel_state.is_pipeline_last_stage() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    setup_logging()
    env = platform.init_distributed()
    arch = ModelArchitecture.from_hf_config(TINY_QWEN3, source="examples/toy/parallel_smoke.py")
    tokens = torch.randint(0, arch.vocab_size, (2, args.seq_len), generator=torch.Generator().manual_seed(0))
    logger.info("world of %d ranks on %s (%s)", env.world_size, platform.device(), platform.backend())

    from megatron.core import dist_checkpointing, parallel_state

    ckpt_dir = [tempfile.mkdtemp(prefix="gopd-smoke-") if env.rank == 0 else None]
    torch.distributed.broadcast_object_list(ckpt_dir)
    platform.init_model_parallel(tp=1, pp=1, seed=0)
    reference = build_gpt_model(arch, ParallelLayout())
    reference_logits = logits_of(reference, tokens, arch.vocab_size)
    dist_checkpointing.save(reference.sharded_state_dict(), ckpt_dir[0])
    logger.info("TP=1 reference built and saved to %s", ckpt_dir[0])

    worst = 0.0
    for tp, pp in ((env.world_size, 1), (1, env.world_size)):
        start = time.perf_counter()
        platform.init_model_parallel(tp=tp, pp=pp, seed=1)
        model = build_gpt_model(arch, ParallelLayout(tp=tp, pp=pp), perform_initialization=False)
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir[0]))
        logits = logits_of(model, tokens, arch.vocab_size)
        diff = torch.zeros(1)
        if parallel_state.is_pipeline_last_stage():
            diff[0] = (logits - reference_logits).abs().max().nan_to_num(nan=float("inf"))
        torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
        worst = max(worst, diff.item())
        logger.info(
            "TP=%d PP=%d: forward+backward in %.2fs, max |logit - reference| = %.2e",
            tp,
            pp,
            time.perf_counter() - start,
            diff.item(),
        )
    if env.rank == 0:
        verdict = "OK" if worst < 1e-5 else "MISMATCH"
        print(f"\nparallel smoke test: {verdict} (max logit difference {worst:.2e} over TP and PP layouts)")
        print("The G-OPD demo (teacher, OPD vs ExOPD) replaces this script once the trainer lands.")
    platform.shutdown_distributed()
    if worst >= 1e-5:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
