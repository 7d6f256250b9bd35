#!/usr/bin/env python
"""ExPO baseline: write theta_base + alpha * (theta_teacher - theta_base) as a new HF checkpoint.

    python tools/expo.py --base Qwen3-1.7B-Base --teacher Qwen3-1.7B --alpha 1.25 --out expo-1.25

Both directories must hold safetensors checkpoints of the same architecture. Tensors are streamed
one at a time; the output gets the teacher's config and tokenizer files. Progress goes to stderr.
The logic lives in `megatron_gopd.evaluation.expo`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from megatron_gopd.evaluation.expo import (
    DEFAULT_MAX_SHARD_BYTES,
    ExpoError,
    expo_merge,
    parse_size,
)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="HF checkpoint directory of the base model")
    parser.add_argument(
        "--teacher", required=True,
        help="HF checkpoint directory of the teacher (also the source of config and tokenizer)",
    )  # fmt: skip
    parser.add_argument("--alpha", required=True, type=float, help="0 = base, 1 = teacher, > 1 extrapolates")
    parser.add_argument("--out", required=True, help="output directory (absent or empty)")
    parser.add_argument(
        "--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES,
        help="largest output shard, e.g. 2GB or 500MB (about the peak memory); default 2GiB",
    )  # fmt: skip
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the merge; returns the process exit code (0 ok, 2 on bad inputs)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    try:
        expo_merge(args.base, args.teacher, args.alpha, args.out, max_shard_bytes=args.max_shard_size)
    except ExpoError as exc:
        print(f"expo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
