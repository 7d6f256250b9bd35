"""Megatron model checkpoints: a ``torch_dist`` distributed checkpoint plus what is needed to use it.

Layout of a checkpoint directory::

    <ckpt>/                    dist_checkpointing files (loadable at any TP/PP/EP)
    <ckpt>/gopd_checkpoint.json    format version, model family, the layout it was saved from
    <ckpt>/hf/                 config.json, tokenizer and generation files of the source model

Writes go to a hidden sibling directory that is renamed into place when complete, so a crash (or
kill) mid-write never leaves a half checkpoint under the final name.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import shutil
import threading
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


# ---------------------------------------------------------------------------------------------
# Loading untrusted checkpoints.
#
# A checkpoint directory holds four kinds of pickle; this is how each is read (`load_distributed`
# passes megatron-core restricted load strategies for the first three):
#
#   .metadata          torch's distributed-checkpoint `Metadata`, a plain pickle: with `_MetadataUnpickler`,
#                      by `check_checkpoint_files` and again as the load reads it (`_RestrictedReader`)
#   byte items of the  megatron-core `ShardedObject`s (`_extra_state`, optimizer metadata), each a
#   *.distcp shards    torch.save'd list that torch's `DefaultLoadPlanner.load_bytes` would unpickle with
#                      weights_only=False: with torch.load(weights_only=True) (`_RestrictedLoadPlanner`)
#   common.pt          megatron-core's common state: the same (`_RestrictedCommonLoadStrategy`)
#   rng_states.pt      the trainer's RNG states: the same (`load_torch_file`)
#
# The one allow-list of what these pickles may hold besides tensors and builtin data (None, bool,
# int, float, complex, str, bytes, tuple, list, dict, set):
#
# - in .metadata, the classes, sizes and types that torch's checkpoint metadata is made of:
_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",  # Metadata, Tensor/BytesStorageMetadata, ChunkStorageMetadata,
    #                                           TensorProperties, MetadataIndex, StorageMeta, _MEM_FORMAT_ENCODING
    "torch.distributed.checkpoint.planner",  # SavePlan, WriteItem, WriteItemType, TensorWriteData: the
    #                                          save plans kept in Metadata.all_local_plans
    "torch.distributed.checkpoint.filesystem",  # _StorageInfo: each item's file, offset and length
)
_METADATA_GLOBALS = {
    ("torch", "Size"),  # tensor shapes
    ("torch.serialization", "_get_layout"),  # how a torch.layout (TensorProperties.layout) is pickled
}
#   and torch's dtypes, layouts and memory formats (TensorProperties); only classes of the modules
#   above, no function of theirs.
#
# - in torch-saved files and byte items: what `torch.load(weights_only=True)` accepts, i.e. tensors,
#   dtypes, layouts, memory formats, torch.Size and OrderedDict, and nothing added by this project.
#   That covers every non-tensor item that this project's checkpoints hold:
#     each linear layer's `_extra_state` (a ShardedObject): [None] (no Transformer Engine FP8 state);
#     the distributed optimizer's (dp_reshardable) ShardedObjects: its param_groups (dicts of floats,
#       bools, tuples and None) and per-bucket numels ({(dtype, dtype): [int]});
#     common.pt: {} for a model, {"optimizer": {"param_state_sharding_type": "dp_reshardable"}} for
#       a training checkpoint;
#     rng_states.pt: per rank, torch's RNG state (a uint8 tensor) and `random.getstate()` (ints).
#   megatron-core itself, when imported, adds classes of its own to torch's list
#   (`torch.serialization.add_safe_globals`: argparse.Namespace, pathlib paths, numpy arrays, its
#   enums and OptimizerConfig): plain data classes that run no code when built; ours need none of them.
#
# Anything else (os.system, any other function or class) is refused with a `CheckpointError` naming
# the checkpoint and the item, before it is called.
# ---------------------------------------------------------------------------------------------


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


class _RefusedPickle(CheckpointError):
    """A pickle in a checkpoint that names more than the allow-list above (raised inside torch's
    distributed loader, which wraps it: `load_distributed` unwraps it)."""


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _weights_only_reason(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, without its advice (to load with weights_only=False)."""
    lines = [line.split(" Please use")[0].strip() for line in str(err).splitlines()]
    kept = [line for line in lines if line and not line.startswith(_TORCH_BOILERPLATE)]
    return " ".join(kept) or str(err).strip().splitlines()[-1]


def _load_weights_only(source: Any, map_location: Any = None) -> Any:
    """`torch.load(weights_only=True)`: the one way this project unpickles a torch-saved file or byte
    item of a checkpoint. A pickle that names more than the allow-list raises `_RefusedPickle`; an
    unreadable one (a truncated zip archive) raises torch's own error."""
    import torch

    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise _RefusedPickle(_weights_only_reason(err)) from err


def load_torch_file(path: str | Path, *, map_location: Any = "cpu") -> Any:
    """A torch-saved file of a checkpoint (``common.pt``, ``rng_states.pt``), loaded with
    ``weights_only=True``; a crafted one is a `CheckpointError` naming the file."""
    try:
        return _load_weights_only(path, map_location)
    except _RefusedPickle as err:
        raise CheckpointError(f"{path}: refusing to load this checkpoint ({err})") from err
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: cannot read this file, truncated or corrupt? ({err})") from err


def _unpickle_metadata(f) -> Any:
    """``.metadata`` read with `_MetadataUnpickler`; refused or unreadable: `_RefusedPickle`."""
    try:
        return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as err:
        raise _RefusedPickle(f"{type(err).__name__}: {err}") from err


def check_checkpoint_files(ckpt_dir: str | Path) -> None:
    """Refuse a distributed checkpoint whose pickled metadata could run code or is unreadable.

    ``<ckpt>/.metadata`` is read here with the allow-list of the classes such metadata holds, so a
    crafted file fails with a `CheckpointError` before the collective load starts (which reads it
    again, with the same restriction).
    """
    path = Path(ckpt_dir) / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} has no .metadata: not a complete distributed checkpoint")
    with open(path, "rb") as f:
        try:
            _unpickle_metadata(f)
        except _RefusedPickle as err:
            raise CheckpointError(f"{path}: refusing to load this checkpoint ({err})") from err.__cause__


# One load at a time swaps megatron-core's planner and reader (see _RestrictedTorchDistLoadStrategy).
_SWAP_LOCK = threading.Lock()


@functools.cache
def _restricted_load_strategy_classes() -> tuple[type, type]:
    """megatron-core's ``torch_dist`` sharded and ``torch`` common load strategies, restricted to
    the allow-list above (built on first use: importing megatron-core is not cheap)."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _RestrictedLoadPlanner(mcore_torch.MCoreLoadPlanner):
        """megatron-core's load planner, but byte items are unpickled with ``weights_only=True``
        (torch's `DefaultLoadPlanner.load_bytes`, which `MCoreLoadPlanner` does not override, uses
        weights_only=False)."""

        def load_bytes(self, read_item, value) -> None:
            fqn = read_item.dest_index.fqn
            try:
                obj = _load_weights_only(value)
            except _RefusedPickle as err:
                info = self.metadata.storage_data.get(read_item.storage_index)
                where = f" in {info.relative_path}" if info is not None else ""
                raise _RefusedPickle(f"shard item {fqn!r}{where}: {err}") from None
            # what DefaultLoadPlanner.load_bytes does with the object
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    class _RestrictedReader(CachedMetadataFileSystemReader):
        """megatron-core's shard reader, but ``.metadata`` is read with `_MetadataUnpickler` (torch's
        `FileSystemReader.read_metadata` uses `pickle.load`): the file `check_checkpoint_files`
        checked may have changed since. Local files only: megatron-core's multi-storage client (off
        unless a program enables it; this project does not) is not supported here."""

        def read_metadata(self):
            if self._cached_metadata is None:
                path = self.fs.concat_path(self.path, ".metadata")
                with self.fs.create_stream(path, "rb") as f:
                    try:
                        metadata = _unpickle_metadata(f)
                    except _RefusedPickle as err:
                        raise _RefusedPickle(f".metadata: {err}") from None
                # what FileSystemReader.read_metadata does with it
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
                self._cached_metadata = metadata
            return self._cached_metadata

    def restricted_reader(checkpoint_dir, cache_metadata: bool = False):
        return _RestrictedReader(checkpoint_dir)

    swaps = {"MCoreLoadPlanner": _RestrictedLoadPlanner, "_get_filesystem_reader": restricted_reader}

    class _RestrictedTorchDistLoadStrategy(mcore_torch.TorchDistLoadShardedStrategy):
        """The ``torch_dist`` load strategy with `_RestrictedLoadPlanner` and `_RestrictedReader`.

        Why a patch: `TorchDistLoadShardedStrategy.load` builds its planner (``MCoreLoadPlanner(...)``)
        and its reader (``_get_filesystem_reader(...)``) inline from its module's globals and takes
        neither as an argument. A copy of that method would drift from megatron-core (0.15 and 0.16
        already differ in it), so for the duration of one load those two names of
        ``megatron.core.dist_checkpointing.strategies.torch`` are the restricted ones, and are put
        back after. The swap is scoped to this strategy, which only `load_distributed` passes; if
        megatron-core's method no longer looks them up there, the load is refused before any file is
        read, rather than run unrestricted.
        """

        def load(self, sharded_state_dict, checkpoint_dir):
            method = mcore_torch.TorchDistLoadShardedStrategy.load
            if method.__globals__ is not vars(mcore_torch) or not set(swaps) <= set(method.__code__.co_names):
                raise CheckpointError(
                    f"{checkpoint_dir}: refusing to load: this megatron-core's torch_dist loader does not build "
                    f"its planner and reader from {', '.join(swaps)}, so its pickles cannot be restricted"
                )
            with _SWAP_LOCK:
                saved = {name: getattr(mcore_torch, name) for name in swaps}
                try:
                    for name, replacement in swaps.items():
                        setattr(mcore_torch, name, replacement)
                    return super().load(sharded_state_dict, checkpoint_dir)
                finally:
                    for name, original in saved.items():
                        setattr(mcore_torch, name, original)

    class _RestrictedCommonLoadStrategy(TorchCommonLoadStrategy):
        """The ``torch`` common strategy with ``common.pt`` loaded by `load_torch_file` (megatron-core
        calls torch.load without weights_only, i.e. whatever torch's default and environment say)."""

        def load_common(self, checkpoint_dir):
            path = Path(checkpoint_dir) / COMMON_STATE_FNAME
            if not path.is_file():
                raise CheckpointError(
                    f"{checkpoint_dir} has no {COMMON_STATE_FNAME}: not a complete distributed checkpoint"
                )
            return load_torch_file(path)

        def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
            # torch_dist keeps sharded objects in its shards (read by the planner above); the
            # separate object files this would unpickle are never read
            raise CheckpointingException(f"{checkpoint_dir}: sharded objects are read from the torch_dist shards")

    return _RestrictedTorchDistLoadStrategy, _RestrictedCommonLoadStrategy


def _refusal_in(err: BaseException) -> Optional[_RefusedPickle]:
    """The `_RefusedPickle` raised on some rank inside torch's distributed loader, if any."""
    for exc, _trace in getattr(err, "failures", {}).values():
        if isinstance(exc, _RefusedPickle):
            return exc
    return None


def load_distributed(sharded_state_dict: dict, ckpt_dir: str | Path) -> dict:
    """`dist_checkpointing.load` after `check_checkpoint_files`, with every pickle of the checkpoint
    restricted to the allow-list above; a crafted item, or a truncated or corrupt shard file, is a
    `CheckpointError` naming the checkpoint (collective)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    check_checkpoint_files(ckpt_dir)
    sharded_strategy, common_strategy = _restricted_load_strategy_classes()
    try:
        return dist_checkpointing.load(
            sharded_state_dict,
            str(ckpt_dir),
            sharded_strategy=sharded_strategy(),
            common_strategy=common_strategy(),
        )
    except CheckpointException as err:
        refused = _refusal_in(err)
        if refused is not None:
            raise CheckpointError(f"{ckpt_dir}: refusing to load this checkpoint ({refused})") from None
        raise _unreadable(ckpt_dir, err) from err
    except (EOFError, pickle.UnpicklingError, OSError) as err:
        raise _unreadable(ckpt_dir, err) from err


def _unreadable(ckpt_dir: str | Path, err: BaseException) -> CheckpointError:
    # torch wraps each rank's read error; its first line names the failing step and ranks
    cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return CheckpointError(
        f"{ckpt_dir}: cannot read the checkpoint's shard files, truncated or corrupt? ({type(err).__name__}: {cause})"
    )


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
