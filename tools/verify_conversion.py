#!/usr/bin/env python
"""Check a converted checkpoint against the HF model it came from: same tokens, same logits?

    python tools/verify_conversion.py --hf-dir Qwen3-1.7B --ckpt ckpt/qwen3-1.7b --tp 2 --pp 1

Runs a random token batch (or ``--prompt`` text, tokenized with the checkpoint's tokenizer) through
`transformers` and through the Megatron model loaded from ``--ckpt`` at the given layout (launching
tp*pp*ep local ranks itself), and prints the max / mean absolute logit difference and the top-1
agreement. Exits 1 above ``--tolerance``, 2 when the checkpoint or the layout is unusable (checked
before any rank starts: e.g. a TP that does not divide the attention heads).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="the HF model directory")
    parser.add_argument("--ckpt", required=True, help="the converted Megatron checkpoint")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="max |logit difference| accepted (fp32: 1e-4 is typical; bf16 needs ~0.1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prompt", default=None, help="text to run instead of random tokens (one sequence; --batch/--seq-len unused)"
    )
    return parser.parse_args(argv)


def _check_before_launch(args) -> None:
    """What one process can check before any rank starts: the checkpoint and the split."""
    from pathlib import Path

    from megatron_gopd.checkpointing import HF_SUBDIR, check_checkpoint_files, read_checkpoint_meta
    from megatron_gopd.models import ModelArchitecture

    if not Path(args.hf_dir, "config.json").is_file():
        raise FileNotFoundError(f"--hf-dir {args.hf_dir}: no config.json")
    read_checkpoint_meta(args.ckpt)
    check_checkpoint_files(args.ckpt)
    arch = ModelArchitecture.from_pretrained(Path(args.ckpt) / HF_SUBDIR)
    arch.validate_parallel(args.tp, args.pp, args.ep, None)


def _tokens(args, vocab_size: int) -> torch.Tensor:
    """``[b, s]`` the token batch: the prompt's tokens, or random ids."""
    if args.prompt is not None:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(args.hf_dir)(args.prompt)["input_ids"]
        return torch.tensor([ids])
    return torch.randint(0, vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(args.seed))


def _megatron_logits(model, tokens: torch.Tensor, vocab_size: int):
    """Full-vocabulary logits on the last pipeline stage (None elsewhere)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    out = {}

    def loss_func(logits):
        out["logits"] = gather_from_tensor_model_parallel_region(logits)[..., :vocab_size].float()
        return logits.sum() * 0, {}

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=lambda _it, m: (m(tokens, positions, None), loss_func),
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=True,
        )
    return out.get("logits") if parallel_state.is_pipeline_last_stage() else None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    from megatron_gopd.cli import ensure_world_size
    from megatron_gopd.log import setup_logging

    setup_logging("WARNING")
    if not os.environ.get("GOPD_RELAUNCHED"):
        try:
            _check_before_launch(args)
        except (ValueError, FileNotFoundError) as err:
            print(f"verify_conversion: {err}", file=sys.stderr)
            return 2
    relaunched = ensure_world_size(args.tp * args.pp * args.ep, "verify-conversion", argv, script=__file__)
    if relaunched is not None:
        return relaunched

    from megatron_gopd import platform
    from megatron_gopd.checkpointing import load_model
    from megatron_gopd.models import ParallelLayout

    env = platform.init_distributed()
    layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep)
    platform.init_model_parallel(tp=args.tp, pp=args.pp, ep=args.ep)
    model, arch = load_model(args.ckpt, layout, dtype="float32")
    model.eval()
    tokens = _tokens(args, arch.vocab_size)  # [b, s]
    logits = _megatron_logits(model, tokens.to(platform.device()), arch.vocab_size)
    status = torch.zeros(1)
    if logits is not None and env.rank == torch.distributed.get_world_size() - 1:
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = reference(tokens).logits.float()
        diff = (logits.cpu() - expected).abs()
        top1 = (logits.cpu().argmax(-1) == expected.argmax(-1)).float().mean().item()
        print(
            f"max |logit diff| {diff.max().item():.3e}  mean {diff.mean().item():.3e}  "
            f"top-1 agreement {top1:.4f}  ({tokens.shape[0]}x{tokens.shape[1]} tokens, "
            f"tp={args.tp} pp={args.pp} ep={args.ep})",
            flush=True,
        )
        status[0] = float(diff.max().item() > args.tolerance)
    torch.distributed.all_reduce(status, op=torch.distributed.ReduceOp.MAX)
    platform.shutdown_distributed()
    return int(status.item())


if __name__ == "__main__":
    sys.exit(main())
