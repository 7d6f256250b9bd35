#!/usr/bin/env python
"""Write the tiny models, converted checkpoints and prompts used by examples/configs/*tiny*.yaml.

python examples/toy/make_tiny_assets.py [--out outputs/tiny_assets]
"""

import argparse

from megatron_gopd import platform
from megatron_gopd.log import setup_logging
from megatron_gopd.testing.tiny_assets import DEFAULT_DIR, build_tiny_assets

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_DIR, help="where to write the assets")
    args = parser.parse_args()
    setup_logging("WARNING")
    platform.init_distributed()
    print(build_tiny_assets(args.out))
    platform.shutdown_distributed()
