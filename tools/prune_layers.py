#!/usr/bin/env python
"""Make a shallower student from a HF checkpoint by keeping some of its decoder layers.

    python tools/prune_layers.py --hf-dir SmolLM2-135M-Instruct --out student-10l --keep 0-6,27-29

Copies the embedding, final norm, head (when untied) and the listed layers (renumbered in the order
given) bit for bit into a new HF directory with ``num_hidden_layers`` set to their number, plus the
tokenizer, chat template and generation config. Convert the result with ``gopd-convert hf-to-mcore``.
Exits 2 with a message when the layer list or the checkpoint is unusable.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="source HF model directory")
    parser.add_argument("--out", required=True, help="new (or empty) output directory")
    parser.add_argument("--keep", required=True, help="layers to keep, e.g. 0-6,27-29 (source numbering)")
    args = parser.parse_args(argv)
    from megatron_gopd.bridge.prune import parse_layer_list, prune_layers

    try:
        out = prune_layers(args.hf_dir, args.out, parse_layer_list(args.keep))
    except (ValueError, FileNotFoundError) as err:
        print(f"prune_layers: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
