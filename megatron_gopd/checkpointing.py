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
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_gopd.bridge.safetensors_io import CheckpointError, copy_side_files
from megatron_gopd.collectives import all_gather_object, barrier, broadcast_object, rank

logger = logging.getLogger(__name__)

META_FILE = "gopd_checkpoint.json"
HF_SUBDIR = "hf"
FORMAT_VERSION = 1


def atomic_directory_write(out_dir: str | Path, write: Callable[[Path], None], replace: bool = False) -> Path:
    """Run ``write(tmp_dir)`` on every rank, then rename ``tmp_dir`` to `out_dir` (collective).

    `out_dir` must not exist or be empty, unless `replace`: then an existing `out_dir` is swapped
    out only once the new one is complete. If `write` fails on any rank the temporary directory is
    removed and `out_dir` is left as it was.
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
                os.replace(tmp_path, out)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            else:
                shutil.rmtree(tmp_path, ignore_errors=True)
        barrier()
    return out


def save_model_checkpoint(model, out_dir: str | Path, *, hf_source_dir: str | Path,
                          meta: dict[str, Any]) -> Path:
    """Save `model` (every rank's share) as a distributed checkpoint under `out_dir` (collective)."""
    from megatron.core import dist_checkpointing

    def write(tmp: Path) -> None:
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
        if rank() == 0:
            (tmp / HF_SUBDIR).mkdir()
            copy_side_files(hf_source_dir, tmp / HF_SUBDIR)
            (tmp / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2))
        barrier()

    return atomic_directory_write(out_dir, write)


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint written by `save_model_checkpoint`; clear error otherwise."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a megatron-gopd checkpoint (no {META_FILE}); convert a "
                              "HF model with `gopd-convert hf-to-mcore` first")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')} is not supported "
                              f"(expected {FORMAT_VERSION})")
    return meta


def load_model_checkpoint(model, ckpt_dir: str | Path) -> None:
    """Load a distributed checkpoint into `model`, whatever layout it was saved from (collective)."""
    from megatron.core import dist_checkpointing

    read_checkpoint_meta(ckpt_dir)
    # Replica ids must come from the model's own data-parallel group: a teacher laid out unlike the
    # student would otherwise be described with the student's replicas and fail validation.
    sharded = model.sharded_state_dict(metadata={"dp_cp_group": model.pg_collection.dp_cp})
    state = dist_checkpointing.load(sharded, str(ckpt_dir))
    model.load_state_dict(state)
