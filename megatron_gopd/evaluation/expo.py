"""ExPO, the training-free baseline: theta = theta_base + alpha * (theta_teacher - theta_base).

`expo_merge` reads two Hugging Face checkpoint directories (``model.safetensors``, or shards listed
in ``model.safetensors.index.json``) and writes a new one. alpha = 0 gives the base, alpha = 1 the
teacher, alpha > 1 extrapolates past the teacher (ExPO's setting, the weight-space analogue of
ExOPD's lam > 1).

How it works and what it guarantees:

- Everything is checked before anything is written: both directories exist, every listed weight
  file exists, the two checkpoints have the same tensor names with the same shapes, the output
  directory is empty or absent. Any mismatch raises `ExpoError` naming the offending tensors.
- Tensors are streamed one at a time through the bridge's `SafetensorsReader` (memory-mapped),
  combined in fp32 (fp64 stays fp64) in chunks, and written by its `ShardedSafetensorsWriter` in
  the teacher's dtype (with a warning where the base's dtype differs). The formula is evaluated as
  ``torch.lerp(base, teacher, alpha)``, which equals base + alpha * (teacher - base) up to fp32
  rounding and is exact at alpha = 0 and 1.
  Peak memory is about one output shard (``max_shard_bytes``) plus one tensor.
- Integer and bool tensors (buffers, not weights) are copied from the teacher. fp8 tensors are
  refused: block-quantised weights come with separate scales, and extrapolating both is wrong.
- Output: shards ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` (a single
  ``model.safetensors`` when everything fits one shard, as ``save_pretrained`` does), plus every
  non-weight top-level file of the teacher directory (config.json, generation_config.json,
  tokenizer files, chat template). It is written to a temporary sibling directory that is renamed
  into place at the end, so a failure leaves no partial output.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import torch

from megatron_gopd.bridge import safetensors_io
from megatron_gopd.bridge.safetensors_io import (
    DTYPE_BYTES,
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    TensorInfo,
    copy_side_files,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

PathLike = Union[str, Path]
CheckpointIndex = dict[str, TensorInfo]

# Files of the teacher directory that are weights (not copied): other formats and their indexes.
_WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json",
)  # fmt: skip
_CHUNK_ELEMENTS = 1 << 24  # fp32 temporaries of at most 64 MB per operand


class ExpoError(CheckpointError):
    """The inputs cannot be merged (missing files, mismatched tensors, non-empty output)."""


@dataclass(frozen=True)
class ExpoSummary:
    """What `expo_merge` wrote."""

    out_dir: Path
    num_tensors: int
    total_bytes: int
    shard_files: tuple[str, ...]


# ----------------------------------------------------------------------------------------------
# Reading and checking the inputs


def read_weight_index(model_dir: PathLike) -> CheckpointIndex:
    """Every tensor of an HF safetensors checkpoint directory, from file headers (no tensor data).

    Raises ExpoError when the directory, its weights, or a file its index names is missing, or when
    the index lists a tensor that its file does not contain.
    """
    with _as_expo_error():
        return SafetensorsReader(model_dir).tensor_infos()


@contextlib.contextmanager
def _as_expo_error() -> Iterator[None]:
    """Report the reader's CheckpointError as an ExpoError (what `tools/expo.py` catches)."""
    try:
        yield
    except ExpoError:
        raise
    except CheckpointError as err:
        raise ExpoError(str(err)) from err


def check_compatible(base: CheckpointIndex, teacher: CheckpointIndex) -> None:
    """Raise ExpoError unless both checkpoints hold the same tensor names with the same shapes."""
    problems = []
    only_base = sorted(base.keys() - teacher.keys())
    only_teacher = sorted(teacher.keys() - base.keys())
    if only_base:
        problems.append(f"{len(only_base)} tensors only in the base, e.g. {only_base[:5]}")
    if only_teacher:
        problems.append(f"{len(only_teacher)} tensors only in the teacher, e.g. {only_teacher[:5]}")
    shapes = [
        f"{name}: base {list(base[name].shape)} vs teacher {list(teacher[name].shape)}"
        for name in sorted(base.keys() & teacher.keys())
        if base[name].shape != teacher[name].shape
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches, e.g. {shapes[:5]}")
    dtypes = {info.dtype for info in [*base.values(), *teacher.values()]}
    if any(dtype.startswith("F8") for dtype in dtypes):
        problems.append("fp8 tensors: dequantize both checkpoints first")
    if dtypes - DTYPE_BYTES.keys():
        problems.append(f"unsupported dtypes {sorted(dtypes - DTYPE_BYTES.keys())}")
    if problems:
        raise ExpoError("base and teacher checkpoints do not match: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# The arithmetic and the shard plan


def extrapolate(base: torch.Tensor, teacher: torch.Tensor, alpha: float, out_dtype: torch.dtype) -> torch.Tensor:
    """``base + alpha * (teacher - base)`` in fp32 (fp64 if an input is), cast to ``out_dtype``.

    Uses ``torch.lerp``, exact at alpha 0 and 1, in chunks so that the fp32 temporaries of a large
    embedding stay small.
    """
    if base.shape != teacher.shape:
        raise ExpoError(f"shape mismatch {tuple(base.shape)} vs {tuple(teacher.shape)}")
    compute = torch.float64 if torch.float64 in (base.dtype, teacher.dtype) else torch.float32
    out = torch.empty(teacher.shape, dtype=out_dtype)
    flat_out, flat_base, flat_teacher = out.view(-1), base.reshape(-1), teacher.reshape(-1)
    for start in range(0, flat_out.numel(), _CHUNK_ELEMENTS):
        part = slice(start, start + _CHUNK_ELEMENTS)
        flat_out[part] = torch.lerp(flat_base[part].to(compute), flat_teacher[part].to(compute), alpha)
    return out


def plan_shards(names: list[str], infos: CheckpointIndex, max_shard_bytes: int) -> list[list[str]]:
    """Split ``names``, in order, into shards of at most ``max_shard_bytes`` as the writer will.

    A tensor bigger than the limit gets a shard of its own.
    """
    return safetensors_io.plan_shards([(name, infos[name].nbytes) for name in names], max_shard_bytes)


def parse_size(text: Union[str, int]) -> int:
    """Bytes from ``"2GB"``, ``"500MB"``, ``"30KB"`` (powers of 1000, like transformers), ``"1GiB"``
    (powers of 1024) or a plain number."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot parse size {text!r} (examples: 2GB, 500MB, 1GiB, 1048576)")
    number, unit, binary = match.groups()
    exponent = "KMGT".index(unit.upper()) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** exponent)


# ----------------------------------------------------------------------------------------------
# The merge


def expo_merge(
    base_dir: PathLike,
    teacher_dir: PathLike,
    alpha: float,
    out_dir: PathLike,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExpoSummary:
    """Write ``base + alpha * (teacher - base)`` of two HF checkpoints to ``out_dir``.

    Args:
        base_dir: HF directory of the base model (theta_base).
        teacher_dir: HF directory of the teacher (theta_teacher); its config and tokenizer files
            are copied to the output.
        alpha: the extrapolation coefficient (0 = base, 1 = teacher, > 1 extrapolates).
        out_dir: where to write; must not exist or be an empty directory.
        max_shard_bytes: largest output shard (also roughly the peak memory of the merge).

    Returns:
        Counts and the shard files written. Raises ExpoError, before writing anything, on any
        mismatch or missing file; on a failure while writing, nothing is left at ``out_dir``.
    """
    out_dir = Path(out_dir)
    if not math.isfinite(alpha):
        raise ExpoError(f"alpha must be finite, got {alpha}")
    if max_shard_bytes < 1:
        raise ExpoError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    _check_output_dir(out_dir)
    base, teacher = read_weight_index(base_dir), read_weight_index(teacher_dir)
    check_compatible(base, teacher)
    _warn_dtype_changes(base, teacher)

    names = list(teacher)  # the teacher's order keeps reads of its shards sequential
    shards = plan_shards(names, teacher, max_shard_bytes)
    total_bytes = sum(teacher[name].nbytes for name in names)
    logger.info(
        "ExPO alpha=%g: %d tensors, %s in %d shard(s) -> %s",
        alpha, len(names), _fmt_bytes(total_bytes), len(shards), out_dir,
    )  # fmt: skip

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.expo-tmp-", dir=out_dir.parent))
    try:
        with _as_expo_error():
            shard_files = _write_shards(names, Path(base_dir), Path(teacher_dir), alpha, tmp_dir, max_shard_bytes)
        _copy_non_weight_files(Path(teacher_dir), tmp_dir)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory portably
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("ExPO done: wrote %s", out_dir)
    return ExpoSummary(out_dir, len(names), total_bytes, tuple(shard_files))


def _check_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExpoError(f"output {out_dir} already exists and is not an empty directory")


def _warn_dtype_changes(base: CheckpointIndex, teacher: CheckpointIndex) -> None:
    changed = sorted(name for name in teacher if base[name].dtype != teacher[name].dtype)
    if changed:
        first = changed[0]
        logger.warning(
            "%d tensors differ in dtype (e.g. %s: base %s, teacher %s); writing the teacher's",
            len(changed), first, base[first].dtype, teacher[first].dtype,
        )  # fmt: skip


def _write_shards(
    names: list[str],
    base_dir: Path,
    teacher_dir: Path,
    alpha: float,
    tmp_dir: Path,
    max_shard_bytes: int,
) -> list[str]:
    """Compute every tensor in ``names`` order and write the shards (one in memory at a time)."""
    base, teacher = SafetensorsReader(base_dir), SafetensorsReader(teacher_dir)
    writer = ShardedSafetensorsWriter(tmp_dir, max_shard_bytes)
    for name in names:
        writer.add(name, _merged_tensor(name, base, teacher, alpha))
    return writer.finish()


def _merged_tensor(name: str, base: SafetensorsReader, teacher: SafetensorsReader, alpha: float) -> torch.Tensor:
    teacher_tensor = teacher.read(name)
    if not teacher_tensor.is_floating_point():
        # Integer/bool buffers are not weights to extrapolate; keep the teacher's.
        return teacher_tensor.contiguous()
    return extrapolate(base.read(name), teacher_tensor, alpha, teacher_tensor.dtype)


def _copy_non_weight_files(teacher_dir: Path, dest: Path) -> None:
    """Copy the teacher's top-level config, tokenizer and generation files (not weights/folders)."""
    side_files = [
        entry.name
        for entry in sorted(teacher_dir.iterdir())
        if entry.is_file() and not entry.name.endswith(_WEIGHT_SUFFIXES)
    ]
    copied = copy_side_files(teacher_dir, dest, side_files)
    logger.info("copied from the teacher: %s", ", ".join(copied) or "nothing")
    if "config.json" not in copied:
        logger.warning("%s has no config.json: from_pretrained cannot load the output", teacher_dir)


def _fmt_bytes(n: int) -> str:
    for exponent, unit in ((3, "GB"), (2, "MB"), (1, "KB")):
        if n >= 1000**exponent:
            return f"{n / 1000**exponent:.2f} {unit}"
    return f"{n} B"


__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "INDEX_FILE",
    "SINGLE_FILE",
    "ExpoError",
    "ExpoSummary",
    "TensorInfo",
    "check_compatible",
    "expo_merge",
    "extrapolate",
    "parse_size",
    "plan_shards",
    "read_weight_index",
]
