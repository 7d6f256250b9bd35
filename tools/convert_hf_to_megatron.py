#!/usr/bin/env python
"""HF directory -> Megatron distributed checkpoint; same flags as ``gopd-convert hf-to-mcore``.

python tools/convert_hf_to_megatron.py --hf-dir Qwen3-1.7B --out ckpt/qwen3-1.7b --tp 2
"""

import sys

from megatron_gopd.cli import convert_main

if __name__ == "__main__":
    sys.exit(convert_main(["hf-to-mcore", *sys.argv[1:]]))
