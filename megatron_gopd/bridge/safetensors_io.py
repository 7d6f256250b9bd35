"""Reading and writing Hugging Face safetensors checkpoints (single file or sharded with an index).

Used by the converter (`gopd-convert`), weight loading and export, and ExPO (`evaluation.expo`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_gopd.checkpointing import SIDE_FILES, CheckpointError, copy_side_files  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Bytes per element of each safetensors dtype string (as the file headers name them).
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives in a checkpoint and what it is, read from the safetensors header."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: "BF16", "F32", ...

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes (KeyError for a dtype outside `DTYPE_BYTES`)."""
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


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
        if not self.dir.is_dir():
            raise CheckpointError(f"checkpoint directory {self.dir} does not exist")
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
        elif (self.dir / SINGLE_FILE).is_file():
            weight_map = {name: SINGLE_FILE for name in self._keys(self.dir / SINGLE_FILE)}
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.dir} (only safetensors checkpoints work)")
        missing_files = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
        if missing_files:
            raise CheckpointError(
                f"{index} lists {', '.join(missing_files)}, which {'is' if len(missing_files) == 1 else 'are'} missing"
            )
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

    def tensor_infos(self) -> dict[str, TensorInfo]:
        """Every tensor's file, shape and dtype, from the file headers (no tensor data is read).

        In index order, grouped by file (so reading them in this order reads each file once).
        Raises CheckpointError when the index lists a tensor that its file does not contain.
        """
        names_by_file: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            names_by_file.setdefault(file, []).append(name)
        infos: dict[str, TensorInfo] = {}
        for file, names in names_by_file.items():
            path = self.dir / file
            handle = self._handle(names[0])
            available = set(handle.keys())
            for name in names:
                if name not in available:
                    raise CheckpointError(f"{path} lacks tensor {name!r}, which its index lists")
                header = handle.get_slice(name)
                infos[name] = TensorInfo(path, tuple(header.get_shape()), header.get_dtype())
        return infos

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
        """The names of all tensors in the checkpoint."""
        return set(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name`, from its file's header."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, index: Optional[tuple[slice, ...]] = None) -> torch.Tensor:
        """The tensor `name` (a fresh copy), or only `index` (row / column slices) of it."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir} has no tensor {name!r}")
        try:
            handle = self._handle(name)
            tensor = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(
                f"cannot read {name!r} from {self.dir / self.weight_map[name]} (truncated file?): {err}"
            ) from err
        self._bytes_since_remap += tensor.numel() * tensor.element_size()
        if self._bytes_since_remap > self._remap_every_bytes:
            self._handles.clear()  # unmaps the files: their pages leave this process's RSS
            self._bytes_since_remap = 0
        return tensor


class ShardedSafetensorsWriter:
    """Writes tensors into ``model-0000x-of-0000N.safetensors`` files of at most `max_shard_bytes`.

    Tensors are buffered only up to one shard (the split follows `plan_shards`); `finish()` renames
    the shards to their final ``-of-N`` names and writes ``model.safetensors.index.json`` (or a single
    ``model.safetensors`` when everything fits one shard, as ``save_pretrained`` does).
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self._written_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue `tensor` under `name`; writes the pending shard first if `tensor` would overflow it."""
        size = tensor.numel() * tensor.element_size()
        if self._pending and _overflows(self._pending_bytes, size, self.max_shard_bytes):
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        file = f"shard-{len(self._files):05d}.tmp.safetensors"
        save_file(self._pending, str(self.out_dir / file), metadata={"format": "pt"})
        self._files.append((file, list(self._pending)))
        self._written_bytes += self._pending_bytes
        logger.info(
            "wrote shard %d: %d tensors so far, %.3f GB",
            len(self._files),
            sum(len(names) for _, names in self._files),
            self._written_bytes / 1e9,
        )
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is pending, give the shards their final names and write the index.

        Returns the weight files written, in order.
        """
        if self._pending or not self._files:
            self._flush()
        if len(self._files) == 1:
            os.replace(self.out_dir / self._files[0][0], self.out_dir / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map = {}
        count = len(self._files)
        finals = []
        for i, (tmp_name, names) in enumerate(self._files):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.out_dir / tmp_name, self.out_dir / final)
            weight_map.update({name: final for name in names})
            finals.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return finals


def _overflows(shard_bytes: int, tensor_bytes: int, max_shard_bytes: int) -> bool:
    """Whether a tensor would push a non-empty shard past the limit (then it starts the next one;
    a tensor bigger than the limit gets a shard of its own)."""
    return shard_bytes + tensor_bytes > max_shard_bytes


def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """The names of ``(name, bytes)`` pairs, in order, split as `ShardedSafetensorsWriter` splits them."""
    shards: list[list[str]] = []
    shard_bytes = 0
    for name, nbytes in sizes:
        if not shards or _overflows(shard_bytes, nbytes, max_shard_bytes):
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes
    return shards


def check_output_dir(out_dir: str | Path) -> None:
    """Refuse an existing non-empty output directory (nothing is ever overwritten)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"output {out} already exists and is not empty; choose another path or remove it")


def dtype_of(name: Optional[str]) -> torch.dtype:
    """HF ``torch_dtype`` string -> torch dtype (float32 when absent)."""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name or "", torch.float32)


def iter_tensors(hf_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a HF checkpoint, one at a time (tests and verification tools)."""
    reader = SafetensorsReader(hf_dir)
    for name in sorted(reader.names()):
        yield name, reader.read(name)
