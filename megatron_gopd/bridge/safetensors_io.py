"""Reading and writing Hugging Face safetensors checkpoints (single file or sharded with an index)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_gopd.checkpointing import SIDE_FILES, CheckpointError, copy_side_files  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
class SafetensorsReader:
    """Lazy access to the tensors of a HF checkpoint directory, one slice at a time.

    Opens shard files on first use; `read(name, index)` reads only the requested slice
    (``safe_open(...).get_slice``), so a rank never holds more than its own share plus one slice.
    safetensors memory-maps its files and every page read stays resident (and counted in the
    process's RSS) while the file is open, so the handles are dropped after every
    `remap_every_bytes` read.
    """

    def __init__(self, hf_dir: str | Path, remap_every_bytes: int = 256 * 1024**2) -> None:
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
        elif (self.dir / SINGLE_FILE).is_file():
            weight_map = {name: SINGLE_FILE for name in self._keys(self.dir / SINGLE_FILE)}
        else:
            raise CheckpointError(f"{self.dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        missing_files = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
        if missing_files:
            raise CheckpointError(f"{self.dir}: shard file(s) listed in the index are missing: "
                                  f"{', '.join(missing_files)}")
        self.weight_map = weight_map
        self._handles: dict[str, object] = {}
        self._remap_every_bytes = remap_every_bytes
        self._bytes_since_remap = 0

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except Exception as err:  # noqa: BLE001 - safetensors raises several types for bad files
            raise CheckpointError(f"cannot read {path} (truncated or not safetensors?): {err}") from err

    def _handle(self, name: str):
        file = self.weight_map[name]
        if file not in self._handles:
            path = self.dir / file
            try:
                self._handles[file] = safe_open(str(path), framework="pt")
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(f"cannot read {path} (truncated or not safetensors?): {err}") from err
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] = (slice(None),)) -> torch.Tensor:
        """The tensor `name`, or only `index` (row / column slices) of it."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir} has no tensor {name!r}")
        try:
            tensor = self._handle(name).get_slice(name)[index]
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"cannot read {name!r} from {self.dir / self.weight_map[name]} "
                                  f"(truncated file?): {err}") from err
        self._bytes_since_remap += tensor.numel() * tensor.element_size()
        if self._bytes_since_remap > self._remap_every_bytes:
            self._handles.clear()  # unmaps the files: their pages leave this process's RSS
            self._bytes_since_remap = 0
        return tensor


class ShardedSafetensorsWriter:
    """Writes tensors into ``model-0000x-of-0000N.safetensors`` files of at most `max_shard_bytes`.

    Tensors are buffered only up to one shard; `finish()` renames the shards to their final
    ``-of-N`` names and writes ``model.safetensors.index.json`` (or a single ``model.safetensors``).
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        file = f"shard-{len(self._files):05d}.tmp.safetensors"
        save_file(self._pending, str(self.out_dir / file), metadata={"format": "pt"})
        self._files.append((file, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        if self._pending or not self._files:
            self._flush()
        if len(self._files) == 1:
            os.replace(self.out_dir / self._files[0][0], self.out_dir / SINGLE_FILE)
            return
        weight_map = {}
        count = len(self._files)
        for i, (tmp_name, names) in enumerate(self._files):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.out_dir / tmp_name, self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))


def check_output_dir(out_dir: str | Path) -> None:
    """Refuse an existing non-empty output directory (nothing is ever overwritten)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"output {out} already exists and is not empty; choose another path "
                              "or remove it")


def dtype_of(name: Optional[str]) -> torch.dtype:
    """HF ``torch_dtype`` string -> torch dtype (float32 when absent)."""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name or "", torch.float32)


def iter_tensors(hf_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a HF checkpoint, one at a time (tests and verification tools)."""
    reader = SafetensorsReader(hf_dir)
    for name in sorted(reader.names()):
        yield name, reader.read(name)
