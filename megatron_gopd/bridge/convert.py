"""Checkpoint conversion: HF directory -> Megatron distributed checkpoint, and back.

Both run as one SPMD job (every rank calls the same function) after `platform.init_distributed()`;
the world must hold the requested TP x PP (EP is carved out of data parallelism, as in Megatron).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_gopd import platform
from megatron_gopd.bridge.safetensors_io import SafetensorsReader, ShardedSafetensorsWriter, check_output_dir
from megatron_gopd.bridge.weights import check_hf_checkpoint, export_hf_weights, load_hf_weights
from megatron_gopd.checkpointing import (
    HF_SUBDIR,
    CheckpointError,
    atomic_directory_write,
    check_checkpoint_files,
    copy_side_files,
    load_model,
    read_checkpoint_meta,
    save_model_checkpoint,
)
from megatron_gopd.config import read_json
from megatron_gopd.models import ModelArchitecture, ParallelLayout, build_gpt_model

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did, for progress output and the benchmark."""

    seconds: float
    bytes: int
    """Weight bytes read (hf-to-mcore, this rank) or written (mcore-to-hf, rank 0)."""
    read_seconds: float = 0.0
    """hf-to-mcore: reading this rank's slices of the HF files into the model."""
    write_seconds: float = 0.0
    """hf-to-mcore: writing the distributed checkpoint (megatron-core's writer, fsync'ed)."""

    @property
    def gb_per_s(self) -> float:
        """Bytes over the whole conversion's wall time."""
        return self.bytes / 1e9 / max(self.seconds, 1e-9)

    @property
    def read_gb_per_s(self) -> float:
        """Bytes over the reading phase alone (what a plain read of the same files compares with)."""
        return self.bytes / 1e9 / max(self.read_seconds, 1e-9)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _check_world(layout: ParallelLayout) -> None:
    if _world() % (layout.tp * layout.pp):
        raise ValueError(
            f"this job has {_world()} ranks but tp x pp = {layout.tp * layout.pp}; launch "
            f"with torchrun --nproc-per-node {layout.tp * layout.pp * layout.ep}"
        )


def check_conversion(direction: str, source: str | Path, out_dir: str | Path, layout: ParallelLayout) -> None:
    """Everything about a conversion that one process can check before any rank starts (the source's
    architecture split at `layout`, the source files, a new or empty `out_dir`); clear errors."""
    if direction == "hf-to-mcore":
        arch = ModelArchitecture.from_pretrained(source)
        check_hf_checkpoint(arch, SafetensorsReader(source))
    else:
        read_checkpoint_meta(source)
        check_checkpoint_files(source)
        arch = ModelArchitecture.from_pretrained(Path(source) / HF_SUBDIR)
    arch.validate_parallel(layout.tp, layout.pp, layout.ep, layout.etp)
    check_output_dir(out_dir)


def hf_to_mcore(
    hf_dir: str | Path, out_dir: str | Path, layout: ParallelLayout, dtype: Optional[str] = None
) -> ConversionReport:
    """Convert a HF checkpoint into a Megatron distributed checkpoint at `layout` (collective).

    Everything is checked before any model is built: the architecture, the split, the presence and
    shapes of every tensor, and that `out_dir` is new or empty. The model is built without random
    initialisation, in the checkpoint's dtype unless `dtype` says otherwise.
    """
    start = time.perf_counter()
    arch = ModelArchitecture.from_pretrained(hf_dir)
    arch.validate_parallel(layout.tp, layout.pp, layout.ep, layout.etp)
    _check_world(layout)
    check_output_dir(out_dir)
    check_hf_checkpoint(arch, SafetensorsReader(hf_dir))
    dtype = dtype or _supported_dtype(arch.torch_dtype)
    platform.init_model_parallel(tp=layout.tp, pp=layout.pp, ep=layout.ep, etp=layout.etp)
    model = build_gpt_model(arch, layout, dtype=dtype, perform_initialization=False)
    logger.info(
        "loading %s (%s, %d layers) at tp=%d pp=%d ep=%d in %s",
        hf_dir,
        arch.hf_architecture,
        arch.num_layers,
        layout.tp,
        layout.pp,
        layout.ep,
        dtype,
    )
    read_start = time.perf_counter()
    bytes_read = load_hf_weights(model, arch, hf_dir)
    read_seconds = time.perf_counter() - read_start
    meta = {
        "family": arch.family,
        "hf_architecture": arch.hf_architecture,
        "dtype": dtype,
        "saved_layout": {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep},
    }
    logger.info("writing distributed checkpoint to %s", out_dir)
    write_start = time.perf_counter()
    save_model_checkpoint(model, out_dir, hf_source_dir=hf_dir, meta=meta)
    report = ConversionReport(time.perf_counter() - start, bytes_read, read_seconds, time.perf_counter() - write_start)
    logger.info(
        "hf-to-mcore done in %.1fs: read %.2f GB in %.1fs (%.3f GB/s on rank 0), wrote the checkpoint in %.1fs",
        report.seconds,
        bytes_read / 1e9,
        report.read_seconds,
        report.read_gb_per_s,
        report.write_seconds,
    )
    return report


def mcore_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    layout: Optional[ParallelLayout] = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> ConversionReport:
    """Export a Megatron checkpoint to a HF directory: sharded safetensors, index, config, tokenizer.

    Runs on any world that fits `layout` (default: TP=PP=EP=1, i.e. every rank loads everything);
    rank 0 writes. The output appears under `out_dir` only once complete.
    """
    start = time.perf_counter()
    layout = layout or ParallelLayout()
    read_checkpoint_meta(ckpt_dir)
    _check_world(layout)
    check_output_dir(out_dir)
    platform.init_model_parallel(tp=layout.tp, pp=layout.pp, ep=layout.ep, etp=layout.etp)
    model, arch = load_model(ckpt_dir, layout)
    written = write_hf_directory(model, arch, out_dir, Path(ckpt_dir) / HF_SUBDIR, max_shard_bytes)
    report = ConversionReport(time.perf_counter() - start, written)
    logger.info("mcore-to-hf done in %.1fs (%.3f GB/s written)", report.seconds, report.gb_per_s)
    return report


def write_hf_directory(
    model,
    arch: ModelArchitecture,
    out_dir: str | Path,
    hf_source_dir: str | Path,
    max_shard_bytes: int = 5 * 1024**3,
    replace: bool = False,
) -> int:
    """Stream `model`'s weights into a HF directory (collective; rank 0 writes); return its bytes.

    Sharded safetensors + index, the config (with the exported dtype) and tokenizer files from
    `hf_source_dir`, written to a temporary directory and renamed into place when complete
    (`replace` swaps out an existing `out_dir` only then).
    """
    written = [0]

    def write(tmp: Path) -> None:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes) if _rank0() else None
        for count, (name, tensor) in enumerate(export_hf_weights(model, arch), start=1):
            if writer is not None:
                writer.add(name, tensor)
                if count % 50 == 0:
                    logger.info("exported %d tensors (%.2f GB)", count, writer.total_bytes / 1e9)
        if writer is not None:
            writer.finish()
            written[0] = writer.total_bytes
            copy_side_files(hf_source_dir, tmp)
            _set_config_dtype(tmp / "config.json", model)

    atomic_directory_write(out_dir, write, replace=replace)
    return written[0]


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _supported_dtype(name: str) -> str:
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _set_config_dtype(config_path: Path, model) -> None:
    """Record the exported tensors' dtype in config.json (transformers reads ``dtype``)."""
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint has no {HF_SUBDIR}/config.json to export")
    config = read_json(config_path)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
