#!/usr/bin/env python
"""Megatron checkpoint -> HF directory; same flags as ``gopd-convert mcore-to-hf``.

python tools/convert_megatron_to_hf.py --ckpt outputs/run/checkpoints/step_50 --out student-hf
"""

import sys

from megatron_gopd.cli import convert_main

if __name__ == "__main__":
    sys.exit(convert_main(["mcore-to-hf", *sys.argv[1:]]))
