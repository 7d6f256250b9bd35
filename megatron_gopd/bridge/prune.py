"""Layer pruning: a smaller student made from a HF checkpoint by keeping some of its decoder layers.

`prune_layers(hf_dir, out_dir, keep)` copies the embedding, the final norm, the head (when untied)
and the decoder layers listed in `keep`, renumbered 0..len(keep)-1 in the order given, into a new
HF directory whose ``config.json`` says ``num_hidden_layers = len(keep)``; the tokenizer, chat
template and generation config are copied beside it. Tensors are copied bit for bit, one at a time
(nothing is initialised, no model is built). The usual first step of distilling a model into a
shallower copy of itself (as in Minitron / ShortGPT-style depth pruning): the pruned student starts
far from its teacher and is brought back by an off-policy warm start, then on-policy distillation.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Sequence

from megatron_gopd.bridge.safetensors_io import SafetensorsReader, ShardedSafetensorsWriter, check_output_dir
from megatron_gopd.checkpointing import CheckpointError

logger = logging.getLogger(__name__)

__all__ = ["prune_layers", "parse_layer_list"]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_NOT_COPIED = ("config.json", "model.safetensors", "model.safetensors.index.json")


def parse_layer_list(text: str) -> list[int]:
    """``"0-6,27-29"`` -> ``[0, 1, 2, 3, 4, 5, 6, 27, 28, 29]`` (ranges inclusive, order kept)."""
    layers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"layer list {text!r}: {part!r} is not a layer number or a range like 0-6")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ValueError(f"layer list {text!r}: range {part!r} runs backwards")
        layers.extend(range(first, last + 1))
    return layers


def prune_layers(hf_dir: str | Path, out_dir: str | Path, keep: Sequence[int]) -> Path:
    """Write a copy of the HF checkpoint `hf_dir` with only the decoder layers `keep` to `out_dir`.

    `keep` lists layer indices of the source (each at most once, any order: the new layer i is source
    layer ``keep[i]``). `out_dir` must be new or empty; it is written to a temporary directory and
    renamed when complete. Raises ValueError naming the field when `keep` is empty, repeats a layer
    or names one the model does not have.
    """
    src, out = Path(hf_dir), Path(out_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{src}: no config.json")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from err
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"{config_path}: num_hidden_layers must be a positive integer, got {layers!r}")
    keep = [int(i) for i in keep]
    if not keep:
        raise ValueError("keep: no layer to keep")
    if len(set(keep)) != len(keep):
        raise ValueError(f"keep: layers {sorted(i for i in set(keep) if keep.count(i) > 1)} are listed twice")
    outside = [i for i in keep if not 0 <= i < layers]
    if outside:
        raise ValueError(f"keep: layers {outside} do not exist ({config_path}: num_hidden_layers={layers})")
    check_output_dir(out)
    new_index = {old: new for new, old in enumerate(keep)}
    reader = SafetensorsReader(src)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-prune"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        writer = ShardedSafetensorsWriter(tmp)
        seen_layers: set[int] = set()
        for name in sorted(reader.names(), key=_hf_order):
            match = _LAYER.match(name)
            if match is None:
                writer.add(name, reader.read(name))
                continue
            old = int(match.group(1))
            seen_layers.add(old)
            if old in new_index:
                writer.add(f"model.layers.{new_index[old]}.{match.group(2)}", reader.read(name))
        missing = sorted(set(keep) - seen_layers)
        if missing:
            raise CheckpointError(f"{src}: the weights have no tensors for layers {missing}")
        writer.finish()
        config["num_hidden_layers"] = len(keep)
        for per_layer in ("layer_types", "mlp_only_layers"):  # per-layer lists follow the kept layers
            if isinstance(config.get(per_layer), list) and len(config[per_layer]) == layers:
                config[per_layer] = [config[per_layer][i] for i in keep]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for path in src.iterdir():
            if path.is_file() and path.name not in _NOT_COPIED and not path.name.endswith(".safetensors"):
                shutil.copy2(path, tmp / path.name)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("pruned %s to layers %s -> %s", src, keep, out)
    return out


def _hf_order(name: str) -> tuple:
    """Embeddings, then layers in numeric order, then the rest (as HF writes them)."""
    match = _LAYER.match(name)
    if match:
        return (1, int(match.group(1)), match.group(2))
    return (0 if "embed" in name else 2, 0, name)
