"""Load HF safetensors into a (parallel) Megatron model, and stream its weights back out in HF form.

Both directions work on whatever layout the model was built with: its own process groups are read
from ``model.pg_collection``, so the student (Megatron's global groups) and a teacher with its own
TP/PP/EP go through the same code.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron_gopd.bridge.mapping import (
    ParamMapping,
    ShardGeometry,
    assemble_shard,
    canonical_name,
    hf_shapes,
    param_mappings,
    shard_ranges,
    split_shards,
)
from megatron_gopd.bridge.safetensors_io import CheckpointError, SafetensorsReader
from megatron_gopd.models.architecture import ModelArchitecture

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RankPlacement:
    """Where this rank's share of a model sits: its stage, TP/EP coordinates and their groups."""

    pp_rank: int
    pp_size: int
    tp_rank: int
    tp_size: int
    ep_rank: int
    ep_size: int
    etp_rank: int
    etp_size: int
    tp_group: Optional[dist.ProcessGroup]
    etp_group: Optional[dist.ProcessGroup]

    @classmethod
    def of(cls, model) -> "RankPlacement":
        pgs = model.pg_collection

        def coords(name: str) -> tuple[int, int, Optional[dist.ProcessGroup]]:
            group = getattr(pgs, name, None)
            if group is None or not dist.is_initialized():
                return 0, 1, None
            return group.rank(), group.size(), group

        pp_rank, pp_size, _ = coords("pp")
        tp_rank, tp_size, tp_group = coords("tp")
        ep_rank, ep_size, _ = coords("ep")
        etp_rank, etp_size, etp_group = coords("expt_tp")
        return cls(pp_rank, pp_size, tp_rank, tp_size, ep_rank, ep_size, etp_rank, etp_size, tp_group, etp_group)

    def split(self, mapping: ParamMapping) -> tuple[int, int, Optional[dist.ProcessGroup]]:
        """(rank, size, group) of the dimension `mapping` is split over."""
        if mapping.expert:
            return self.etp_rank, self.etp_size, self.etp_group
        return self.tp_rank, self.tp_size, self.tp_group


def _offsets(arch: ModelArchitecture, place: RankPlacement) -> tuple[int, int]:
    layers_per_stage = arch.num_layers // place.pp_size
    experts_per_rank = (arch.num_experts or 0) // place.ep_size
    return place.pp_rank * layers_per_stage, place.ep_rank * experts_per_rank


def _local_params(model, arch: ModelArchitecture, place: RankPlacement) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters by canonical name."""
    layer_offset, expert_offset = _offsets(arch, place)
    out = {}
    for name, param in model.named_parameters():
        canonical = canonical_name(name, layer_offset, expert_offset)
        if canonical is not None:
            out[canonical] = param
    return out


def check_hf_checkpoint(arch: ModelArchitecture, reader: SafetensorsReader) -> None:
    """Every tensor `arch` needs is present with its shape; raises CheckpointError listing problems."""
    expected = hf_shapes(arch)
    names = reader.names()
    _check_tied_flag(arch, reader, names)
    missing = sorted(set(expected) - names)
    if missing:
        raise CheckpointError(
            f"{reader.dir} lacks {len(missing)} tensor(s) the config implies, e.g. {', '.join(missing[:5])}"
        )
    wrong = [
        f"{n}: {reader.shape(n)} (config implies {shape})" for n, shape in expected.items() if reader.shape(n) != shape
    ]
    if wrong:
        raise CheckpointError(f"{reader.dir}: tensor shapes disagree with config.json: " + "; ".join(wrong[:5]))


def _check_tied_flag(arch: ModelArchitecture, reader: SafetensorsReader, names: set[str]) -> None:
    """``tie_word_embeddings`` must agree with the tensors: an untied config needs ``lm_head.weight``;
    a tied one may carry a copy of the embedding (some exports do) but not a different head, which
    every loader, transformers included, would silently drop."""
    config = reader.dir / "config.json"
    if not arch.tie_word_embeddings and "lm_head.weight" not in names:
        raise CheckpointError(
            f"{config}: tie_word_embeddings is false but {reader.dir} has no lm_head.weight; if the head is "
            "the embedding, set tie_word_embeddings: true"
        )
    if arch.tie_word_embeddings and "lm_head.weight" in names:
        head, embedding = reader.read("lm_head.weight"), reader.read("model.embed_tokens.weight")
        if head.shape != embedding.shape or not torch.equal(head, embedding):
            raise CheckpointError(
                f"{config}: tie_word_embeddings is true but {reader.dir} has an lm_head.weight that differs "
                "from model.embed_tokens.weight; set tie_word_embeddings: false to use that head, or drop it"
            )


@torch.no_grad()
def load_hf_weights(model, arch: ModelArchitecture, hf_dir: str | Path) -> int:
    """Copy this rank's share of a HF checkpoint into `model`; return the number of bytes read.

    Each rank reads only the slices it holds. Every parameter of the model must be covered (an
    unmapped parameter is an error, never silently left at its initial value).
    """
    reader = SafetensorsReader(hf_dir)
    check_hf_checkpoint(arch, reader)
    place = RankPlacement.of(model)
    mappings = {m.megatron: m for m in param_mappings(arch)}
    params = _local_params(model, arch, place)
    unmapped = sorted(set(params) - set(mappings))
    if unmapped:
        raise CheckpointError(f"model parameters with no HF source: {', '.join(unmapped[:5])}")
    geo = ShardGeometry.of(arch, place.tp_size)
    bytes_read = 0
    for name, param in params.items():
        mapping = mappings[name]
        rank, size, _ = place.split(mapping)
        shapes = [reader.shape(h) for h in mapping.hf]
        parts = [
            reader.read(h, index) for h, index in zip(mapping.hf, shard_ranges(mapping.kind, shapes, rank, size, geo))
        ]
        bytes_read += sum(p.numel() * p.element_size() for p in parts)
        shard = assemble_shard(mapping.kind, parts, rank, size, geo)
        if shard.shape != param.shape:
            raise CheckpointError(
                f"{name}: built {tuple(shard.shape)} from {mapping.hf} but the model expects {tuple(param.shape)}"
            )
        param.data.copy_(shard.to(param.dtype))
    return bytes_read


def _stage_of(mapping: ParamMapping, arch: ModelArchitecture, pp_size: int) -> int:
    if mapping.megatron.startswith("embedding."):
        return 0
    if mapping.megatron.startswith("decoder.layers."):
        return int(mapping.megatron.split(".")[2]) // (arch.num_layers // pp_size)
    return pp_size - 1  # final norm and output layer


@torch.no_grad()
def export_hf_weights(model, arch: ModelArchitecture) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for the whole model, in HF order, on every rank.

    All ranks must iterate the generator to the end together (it runs collectives): tensor-parallel
    shards are gathered within their group, then the stage (and expert-parallel rank) that owns a
    tensor broadcasts it. Memory stays at one full tensor at a time beyond the model itself.
    """
    place = RankPlacement.of(model)
    params = _local_params(model, arch, place)
    shapes = hf_shapes(arch)
    dtype = next(iter(params.values())).dtype
    device = next(iter(params.values())).device
    world = dist.get_world_size() if dist.is_initialized() else 1
    coords = [(place.pp_rank, place.tp_rank, place.ep_rank, place.etp_rank)]
    if world > 1:
        coords = [None] * world
        dist.all_gather_object(coords, (place.pp_rank, place.tp_rank, place.ep_rank, place.etp_rank))
    experts_per_rank = (arch.num_experts or 0) // place.ep_size
    geo = ShardGeometry.of(arch, place.tp_size)

    for mapping in param_mappings(arch):
        if mapping.megatron == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        stage = _stage_of(mapping, arch, place.pp_size)
        owner_ep = int(mapping.megatron.split(".")[6]) // experts_per_rank if mapping.expert else None
        local = params.get(mapping.megatron)
        tensors: list[torch.Tensor] = []
        if local is not None:
            rank, size, group = place.split(mapping)
            shards = [local.data]
            if size > 1 and mapping.kind != "replicated":
                shards = [torch.empty_like(local.data) for _ in range(size)]
                dist.all_gather(shards, local.data.contiguous(), group=group)
            tensors = split_shards(mapping.kind, shards, geo)
        held_everywhere = place.pp_size == 1 and (not mapping.expert or place.ep_size == 1)
        if world > 1 and not held_everywhere:
            source = min(
                r
                for r, (pp, tp, ep, etp) in enumerate(coords)
                if pp == stage and (ep == owner_ep and etp == 0 if mapping.expert else tp == 0)
            )
            if not tensors:
                tensors = [torch.empty(shapes[h], dtype=dtype, device=device) for h in mapping.hf]
            for tensor in tensors:
                dist.broadcast(tensor, src=source)
        for hf_name, tensor in zip(mapping.hf, tensors):
            yield hf_name, tensor
