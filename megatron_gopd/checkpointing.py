"""Megatron model checkpoints: a ``torch_dist`` distributed checkpoint plus what is needed to use it.

Layout of a checkpoint directory::

    <ckpt>/                    dist_checkpointing files (loadable at any TP/PP/EP)
    <ckpt>/gopd_checkpoint.json    format version, model family, the layout it was saved from
    <ckpt>/hf/                 config.json, tokenizer and generation files of the source model

Writes go to a hidden sibling directory that is renamed into place when complete, so a crash (or
kill) mid-write never leaves a half checkpoint under the final name.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from megatron_gopd.collectives import all_gather_object, barrier, broadcast_object, rank
from megatron_gopd.config import read_json
from megatron_gopd.models import ParallelLayout

logger = logging.getLogger(__name__)

META_FILE = "gopd_checkpoint.json"
HF_SUBDIR = "hf"
FORMAT_VERSION = 1

# Files copied next to converted checkpoints so that a tokenizer and generation defaults travel along.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or does not match the model; the message says which."""


def copy_side_files(src_dir: str | Path, dst_dir: str | Path, names: Iterable[str] = SIDE_FILES) -> list[str]:
    """Copy the config / tokenizer / generation files that exist in `src_dir`; return their names."""
    copied = []
    for name in names:
        src = Path(src_dir) / name
        if src.is_file():
            shutil.copy2(src, Path(dst_dir) / name)
            copied.append(name)
    return copied


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then each directory that names them, to stable storage.

    megatron-core fsyncs its shard files but not ``common.pt`` / ``metadata.json`` nor the
    directories; files already flushed cost next to nothing here.
    """
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def atomic_directory_write(out_dir: str | Path, write: Callable[[Path], None], replace: bool = False) -> Path:
    """Run ``write(tmp_dir)`` on every rank, then rename ``tmp_dir`` to `out_dir` (collective).

    `out_dir` must not exist or be empty, unless `replace`: then an existing `out_dir` is swapped
    out only once the new one is complete. If `write` fails on any rank the temporary directory is
    removed and `out_dir` is left as it was. What is renamed into place is on stable storage first
    (every file and directory fsync'ed), and so is the rename: a crash, even of the machine, leaves
    either the old state or the complete new directory.
    """
    out = Path(out_dir).resolve()
    tmp: Optional[str] = None
    if rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = str(out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
    tmp_path = Path(broadcast_object(tmp))
    ok = True
    try:
        write(tmp_path)
    except BaseException:
        ok = False
        raise
    finally:
        status = all_gather_object(ok)
        if rank() == 0:
            if all(status):
                old = None
                if out.exists() and replace:
                    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                    os.replace(out, old)
                elif out.exists():
                    out.rmdir()  # empty: checked by the caller before any work
                _fsync_tree(tmp_path)
                os.replace(tmp_path, out)
                _fsync_path(out.parent)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            else:
                shutil.rmtree(tmp_path, ignore_errors=True)
        barrier()
    return out


def _use_in_process_write_results() -> None:
    """Let megatron-core's checkpoint writer pass its write results through an in-process queue.

    Its torch_dist writer forks one file writer per bucket; they report to the saving process,
    which puts the collected results into a module-wide queue that, made for asynchronous saves,
    lives in a spawned multiprocessing manager. Starting that helper costs a fresh interpreter
    that re-imports the main module (about 1 s, far more on a busy host: most of a small
    conversion's write time). Our saves are synchronous, so the queue's producer and consumer are
    this same process and a `queue.Queue` carries the results. With no helper process, a signal to
    the whole process group (a scheduler stopping the job) cannot kill part of a save. A queue
    already set is kept.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "absent") is None:
        import queue

        filesystem_async._results_queue = queue.Queue()


def save_model_checkpoint(
    model,
    out_dir: str | Path,
    *,
    hf_source_dir: str | Path,
    meta: dict[str, Any],
    sharded_state_dict: Optional[dict] = None,
    write_extra: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Save `model` (every rank's share) as a distributed checkpoint under `out_dir` (collective).

    The one checkpoint writer of the project: `gopd-convert` writes a bare model this way, the
    trainer a training checkpoint, by passing its model + optimizer `sharded_state_dict` and a
    `write_extra(tmp_dir)` that rank 0 calls to add its own files (trainer state, RNG). `meta` is
    recorded in the metadata file with the format version; ``hf/`` gets the side files (config,
    tokenizer) of `hf_source_dir`.
    """
    from megatron.core import dist_checkpointing

    _use_in_process_write_results()

    def write(tmp: Path) -> None:
        dist_checkpointing.save(
            model.sharded_state_dict() if sharded_state_dict is None else sharded_state_dict, str(tmp)
        )
        if rank() == 0:
            (tmp / HF_SUBDIR).mkdir()
            copy_side_files(hf_source_dir, tmp / HF_SUBDIR)
            (tmp / META_FILE).write_text(json.dumps({**meta, "format_version": FORMAT_VERSION}, indent=2))
            if write_extra is not None:
                write_extra(tmp)
        barrier()

    return atomic_directory_write(out_dir, write)


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint written by `save_model_checkpoint`; clear error otherwise."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt_dir} is not a megatron-gopd checkpoint (no {META_FILE}); convert a "
            "HF model with `gopd-convert hf-to-mcore` first"
        )
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {meta.get('format_version')} is not supported (expected {FORMAT_VERSION})"
        )
    return meta


# What torch's distributed-checkpoint metadata (``<ckpt>/.metadata``, a pickle) may refer to: the
# dataclasses and enums of its metadata, torch sizes, dtypes and layouts. Anything else (a function
# such as os.system, any other class) is refused before torch unpickles the file itself.
_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        import torch

        obj = super().find_class(module, name) if module.split(".")[0] == "torch" else None
        allowed = (
            (module in _METADATA_MODULES and isinstance(obj, type))
            or (module, name) in _METADATA_GLOBALS
            or (module == "torch" and isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which checkpoint metadata never holds")
        return obj


def check_checkpoint_files(ckpt_dir: str | Path) -> None:
    """Refuse a distributed checkpoint whose pickled metadata could run code or is unreadable.

    torch's loader unpickles ``<ckpt>/.metadata`` without restriction; it is read here first with
    an allow-list of the classes such metadata holds, so a crafted file fails with a
    `CheckpointError` instead of running what it names.
    """
    path = Path(ckpt_dir) / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} has no .metadata: not a complete distributed checkpoint")
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: refusing to load this checkpoint ({type(err).__name__}: {err})") from err


def load_distributed(sharded_state_dict: dict, ckpt_dir: str | Path) -> dict:
    """`dist_checkpointing.load` after `check_checkpoint_files`; a truncated or corrupt shard file is
    a `CheckpointError` naming the checkpoint (collective)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    check_checkpoint_files(ckpt_dir)
    try:
        return dist_checkpointing.load(sharded_state_dict, str(ckpt_dir))
    except (EOFError, pickle.UnpicklingError, OSError, CheckpointException) as err:
        # torch wraps each rank's read error; its first line names the failing step and ranks
        cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{ckpt_dir}: cannot read the checkpoint's shard files, truncated or corrupt? "
            f"({type(err).__name__}: {cause})"
        ) from err


def load_model_checkpoint(model, ckpt_dir: str | Path) -> None:
    """Load a distributed checkpoint into `model`, whatever layout it was saved from (collective)."""
    read_checkpoint_meta(ckpt_dir)
    # Replica ids must come from the model's own data-parallel group: a teacher laid out unlike the
    # student would otherwise be described with the student's replicas and fail validation.
    sharded = model.sharded_state_dict(metadata={"dp_cp_group": model.pg_collection.dp_cp})
    model.load_state_dict(load_distributed(sharded, ckpt_dir))


def load_model(
    ckpt_dir: str | Path,
    layout: ParallelLayout,
    *,
    dtype: Optional[str] = None,
    pg_collection: Any = None,
    **build_options: Any,
):
    """Build this rank's part of a checkpoint's model at `layout` and load it; returns (model, arch).

    The one model loader of the project (student, teachers, references, conversion, evaluation).
    `dtype` defaults to the one the checkpoint was saved in; Megatron's parallel state (or
    `pg_collection`, for a model laid out unlike the student) must already describe `layout`.
    `build_options` go to `models.build_gpt_model` (e.g. ``recompute``). The model is built
    without random initialisation.
    """
    from megatron_gopd.models import ModelArchitecture, build_gpt_model

    meta = read_checkpoint_meta(ckpt_dir)
    arch = ModelArchitecture.from_pretrained(Path(ckpt_dir) / HF_SUBDIR)
    arch.validate_parallel(layout.tp, layout.pp, layout.ep, layout.etp)
    model = build_gpt_model(
        arch,
        layout,
        dtype=dtype or meta.get("dtype", "float32"),
        pg_collection=pg_collection,
        perform_initialization=False,
        **build_options,
    )
    load_model_checkpoint(model, ckpt_dir)
    return model, arch
