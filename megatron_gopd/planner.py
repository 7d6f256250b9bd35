"""Memory plan of a `gopd-train` job, per rank and per phase, computed from shapes alone.

Nothing is built and no rank starts: the plan reads each model's architecture (``config.json``)
and the job's layouts and lengths, and adds up what one GPU holds in each phase of a step:

* **static** (all the time): the student's parameters, fp32 gradient buffer and Adam states
  (sharded over data parallelism with the distributed optimizer), the teachers' and references'
  parameters at their own layouts (only while they score when ``scoring.offload_to_cpu``), and a
  fixed allowance for the CUDA context and communication buffers;
* **rollout**: the KV cache (`rollout.kv_cache_gb`, or what is left of the device after the static
  state times `rollout.kv_cache_fraction`) and the sampler's logits;
* **scoring**: one forward micro-batch (``scoring.micro_batch_tokens``) of the largest pool model:
  one layer's transient activations, the attention scores when the attention materialises them,
  and fp32 log-softmax logits;
* **training**: the student's stored activations for the micro-batches in flight (full
  recomputation keeps one hidden state per layer), one layer's recomputed activations and their
  gradients, and the log-prob head.

Estimates follow the usual accounting of Megatron-style transformers (activations of a layer are
a small multiple of tokens x hidden and tokens x ffn / tp; local attention adds heads x s^2
scores). They are meant to say which phase does not fit and what to change, not to the megabyte.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

from megatron_gopd.config import read_json
from megatron_gopd.logprobs import DEFAULT_CHUNK_ELEMENTS
from megatron_gopd.models import ModelArchitecture, ParallelLayout
from megatron_gopd.models.builder import torch_dtype
from megatron_gopd.rollout.kv_slots import KVSlotShape

GB = 1e9
AttentionKind = Literal["sdpa", "local"]
"""``sdpa``: fused kernels that never hold [heads, s, s] scores (SDPA, FlashAttention, TE);
``local``: megatron-core's local attention, which does."""

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LOGITS_CHUNK_ELEMENTS = DEFAULT_CHUNK_ELEMENTS
"""Logits elements one log-prob chunk holds (scoring and training compute the head chunk by chunk)."""
CONTEXT_OVERHEAD_GB = 4.0
"""CUDA context, NCCL buffers and allocator slack on one GPU (measured ~4 GB at 8 ranks)."""
CPU_PROCESS_OVERHEAD_GB = 1.0
"""One CPU rank's runtime beside its tensors: torch, megatron-core and the trainer imported take
~0.5 GB resident (measured), plus gloo buffers and allocator slack."""


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a parameter dtype name (``bfloat16`` -> 2)."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[dtype]


# ----------------------------------------------------------------------------------------------
# Shapes


def parameters_per_rank(arch: ModelArchitecture, layout: ParallelLayout) -> int:
    """Parameters held by the most loaded rank of `arch` at `layout` (a pipeline stage's layers
    plus the embedding and output layer, each split over tensor / expert parallelism)."""
    h, tp = arch.hidden_size, layout.tp
    head_dim, heads, groups = arch.kv_channels, arch.num_attention_heads, arch.num_query_groups
    attention = (h * (heads + 2 * groups) * head_dim + heads * head_dim * h) // tp + 4 * h
    if arch.is_moe:
        experts_here = arch.num_experts // max(layout.ep, 1)
        mlp = experts_here * 3 * h * arch.moe_ffn_hidden_size // layout.expert_tp + h * arch.num_experts
    else:
        mlp = 3 * h * arch.ffn_hidden_size // tp
    layers = -(-arch.num_layers // layout.pp)
    vocab = arch.padded_vocab_size(tp) * h // tp
    # With one stage the embedding and (untied) output layer live together; with several, the first
    # holds the embedding and the last the output layer (a copy of the embedding when tied).
    embeddings = vocab * (1 if arch.tie_word_embeddings else 2) if layout.pp == 1 else vocab
    return layers * (attention + mlp) + embeddings


def kv_bytes_per_token(arch: ModelArchitecture, tp: int, dtype: str) -> int:
    """Key + value cache bytes of one token on one rank (all layers, this rank's KV heads), as the
    fast rollout engine lays its slots out."""
    return KVSlotShape.for_model(arch, tp, torch_dtype(dtype)).bytes_per_token()


def kv_cache_slots(arch: ModelArchitecture, tp: int, dtype: str, sample_tokens: int, budget_bytes: float) -> int:
    """How many samples of `sample_tokens` tokens (prompt + response) a KV budget holds at once (0 if none)."""
    return int(budget_bytes // (sample_tokens * kv_bytes_per_token(arch, tp, dtype)))


# ----------------------------------------------------------------------------------------------
# The plan


@dataclasses.dataclass
class PhaseMemory:
    """Bytes one rank holds during one phase, by item (the static state is counted in every phase)."""

    name: str
    items: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.items.values())


@dataclasses.dataclass
class MemoryPlan:
    """The per-rank memory of each phase of a step, against one device's memory."""

    device_bytes: float
    static: PhaseMemory
    phases: list[PhaseMemory]
    kv_slots: int
    sample_tokens: int
    """Longest sample the rollout must hold: prompt + max_new_tokens."""
    notes: list[str]

    def peak(self, phase: PhaseMemory) -> float:
        """Static state plus the phase's own memory."""
        return self.static.total + phase.total

    @property
    def worst(self) -> PhaseMemory:
        return max(self.phases, key=self.peak)

    @property
    def fits(self) -> bool:
        return self.kv_slots >= 1 and all(self.peak(p) <= self.device_bytes for p in self.phases)

    def advice(self) -> list[str]:
        """What to change, phase by phase, when the plan does not fit."""
        out = []
        if self.kv_slots < 1:
            out.append(
                f"rollout: the KV budget holds no sample of {self.sample_tokens} tokens; raise "
                "rollout.kv_cache_gb (or kv_cache_fraction), lower rollout.max_new_tokens / "
                "data.max_prompt_length, or raise the student's tp"
            )
        for phase in self.phases:
            if self.peak(phase) <= self.device_bytes:
                continue
            out.append(
                f"{phase.name}: needs {self.peak(phase) / GB:.1f} GB of {self.device_bytes / GB:.1f} GB; "
                + _PHASE_ADVICE[phase.name]
            )
        return out

    def table(self) -> str:
        """A per-rank table of every item and phase, in GB."""
        lines = [
            f"per-rank memory plan (device {self.device_bytes / GB:.1f} GB)",
            f"  {'static state':<44}{self.static.total / GB:>9.2f} GB",
        ]
        lines += [f"    {k:<42}{v / GB:>9.2f}" for k, v in self.static.items.items()]
        for phase in self.phases:
            verdict = "fits" if self.peak(phase) <= self.device_bytes else "DOES NOT FIT"
            lines.append(f"  {phase.name + ' (peak, with static)':<44}{self.peak(phase) / GB:>9.2f} GB  {verdict}")
            lines += [f"    {k:<42}{v / GB:>9.2f}" for k, v in phase.items.items()]
        lines.append(f"  rollout KV slots: {self.kv_slots} samples of {self.sample_tokens} tokens")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """A JSON-ready summary (GB per item)."""
        return {
            "device_gb": self.device_bytes / GB,
            "fits": self.fits,
            "kv_slots": self.kv_slots,
            "sample_tokens": self.sample_tokens,
            "static_gb": {k: v / GB for k, v in self.static.items.items()},
            "phases_gb": {
                p.name: {"peak": self.peak(p) / GB, **{k: v / GB for k, v in p.items.items()}} for p in self.phases
            },
            "notes": self.notes,
        }


_PHASE_ADVICE = {
    "rollout": "lower rollout.kv_cache_gb / kv_cache_fraction, or spread the student over more GPUs (tp)",
    "scoring": "lower scoring.micro_batch_tokens, raise a teacher's tp / pp / ep, or set scoring.offload_to_cpu",
    "training": "lower micro_batch_tokens, set student.recompute=true, or raise student.tp / pp",
}


@dataclasses.dataclass(frozen=True)
class PlannedModel:
    """A model of the job as the planner sees it: its shape, layout and dtype."""

    role: str
    arch: ModelArchitecture
    layout: ParallelLayout
    dtype: str
    attention: AttentionKind = "sdpa"
    """How its attention computes (``local``: it materialises the scores and cannot pack)."""


def plan_memory(
    *,
    student: PlannedModel,
    pool: list[PlannedModel],
    world_size: int,
    device_bytes: float,
    sample_tokens: int,
    micro_batch_tokens: int,
    scoring_micro_batch_tokens: int,
    recompute: bool,
    distributed_optimizer: bool = True,
    offload_pool: bool = False,
    kv_cache_bytes: Optional[float] = None,
    kv_cache_fraction: float = 0.9,
    attention: Optional[AttentionKind] = None,
    logprobs_from_hidden: bool = True,
    topk: int = 0,
    overhead_bytes: float = CONTEXT_OVERHEAD_GB * GB,
    overhead_label: str = "CUDA context / communication",
) -> MemoryPlan:
    """The per-rank `MemoryPlan` of a job; see the module docstring for what each phase counts.

    A micro-batch holds at most its token budget whether it is packed (summed lengths) or
    right-padded (rows x padded length), so both count the budget's tokens; only attention that
    materialises scores (`attention` ``local``, which cannot pack) adds rows x heads x s^2.
    `attention` overrides every model's own `PlannedModel.attention` when given. `overhead_bytes`
    is what a rank holds beside its tensors (`CONTEXT_OVERHEAD_GB` on a GPU,
    `CPU_PROCESS_OVERHEAD_GB` for a CPU rank), named `overhead_label` in the table.
    """
    notes: list[str] = []
    s_arch, s_layout = student.arch, student.layout
    dp = max(world_size // (s_layout.tp * s_layout.pp), 1)
    student_params = parameters_per_rank(s_arch, s_layout)
    param_bytes = dtype_bytes(student.dtype)
    # Adam: exp_avg + exp_avg_sq in fp32, plus fp32 main weights when training in 16 bits.
    optimizer_bytes = (8 + (4 if param_bytes < 4 else 0)) * student_params / (dp if distributed_optimizer else 1)
    static = {
        "student parameters": student_params * param_bytes,
        "student gradients (fp32 buffer)": student_params * 4.0,
        f"optimizer states ({'sharded over dp' if distributed_optimizer else 'replicated'})": optimizer_bytes,
        overhead_label: overhead_bytes,
    }
    pool_params = {f"{m.role} parameters": parameters_per_rank(m.arch, m.layout) * dtype_bytes(m.dtype) for m in pool}
    if offload_pool:
        notes.append("scoring.offload_to_cpu: pool models count only while the largest one scores")
    else:
        static.update(pool_params)
    static_phase = PhaseMemory("static", static)

    # Rollout: the KV cache takes a budget, not batch x max length.
    if kv_cache_bytes is None:
        kv_cache_bytes = max((device_bytes - static_phase.total) * kv_cache_fraction, 0.0)
        notes.append(f"KV budget: {kv_cache_fraction:.0%} of the memory left after the static state")
    slots = kv_cache_slots(s_arch, s_layout.tp, student.dtype, sample_tokens, kv_cache_bytes)
    logits = max(slots, 1) * s_arch.padded_vocab_size(s_layout.tp) / s_layout.tp * 4 * 2
    rollout = PhaseMemory("rollout", {"KV cache": kv_cache_bytes, "sampler logits (fp32)": logits})

    # Scoring: forward only, one micro-batch of the largest model at a time.
    scoring_items: dict[str, float] = {}
    if pool:
        biggest = max(pool, key=lambda m: parameters_per_rank(m.arch, m.layout))
        tokens = scoring_micro_batch_tokens
        width = topk + 1
        scoring_items = {
            "one layer's activations": _forward_layer_bytes(biggest.arch, biggest.layout, tokens, biggest.dtype),
            "attention scores": _score_bytes(
                biggest.arch, biggest.layout, tokens, sample_tokens, attention or biggest.attention
            ),
            # logits exist one chunk of positions at a time (megatron_gopd.logprobs), in fp32
            "logits chunk (fp32)": min(
                tokens * biggest.arch.padded_vocab_size(biggest.layout.tp) / biggest.layout.tp, LOGITS_CHUNK_ELEMENTS
            )
            * 4
            * 3
            + tokens * width * 8,
        }
        if offload_pool:
            scoring_items["the scoring model's parameters"] = max(pool_params.values())
    scoring = PhaseMemory("scoring", scoring_items)

    # Training: 1F1B keeps up to pp micro-batches in flight on the first stage.
    tokens = micro_batch_tokens
    layers = -(-s_arch.num_layers // s_layout.pp)
    layer_bytes = _train_layer_bytes(s_arch, s_layout, tokens, student.dtype)
    hidden = tokens * s_arch.hidden_size * param_bytes
    in_flight = s_layout.pp
    stored = layers * (hidden if recompute else layer_bytes) * in_flight
    vocab_part = s_arch.padded_vocab_size(s_layout.tp) / s_layout.tp
    head_elements = min(tokens * vocab_part, LOGITS_CHUNK_ELEMENTS) if logprobs_from_hidden else tokens * vocab_part
    training = PhaseMemory(
        "training",
        {
            f"stored activations ({'recompute' if recompute else 'no recompute'}, {in_flight} in flight)": stored,
            ("one layer recomputed + its gradients" if recompute else "one layer's activation gradients"): 2
            * layer_bytes
            if recompute
            else layer_bytes,
            "attention scores": _score_bytes(s_arch, s_layout, tokens, sample_tokens, attention or student.attention)
            * 2,
            "log-prob head (chunked)" if logprobs_from_hidden else "logits (fp32, with gradient)": head_elements * 4 * 3
            + tokens * (topk + 1) * 8,
        },
    )
    return MemoryPlan(device_bytes, static_phase, [rollout, scoring, training], slots, sample_tokens, notes)


def _forward_layer_bytes(arch: ModelArchitecture, layout: ParallelLayout, tokens: int, dtype: str) -> float:
    """Transient activations of one layer's forward pass (no gradient kept)."""
    ffn = arch.moe_ffn_hidden_size * arch.moe_router_topk if arch.is_moe else arch.ffn_hidden_size
    return tokens * dtype_bytes(dtype) * (4 * arch.hidden_size + 3 * ffn / layout.expert_tp)


def _train_layer_bytes(arch: ModelArchitecture, layout: ParallelLayout, tokens: int, dtype: str) -> float:
    """Activations one layer stores for its backward pass (Megatron-style accounting, no scores)."""
    h = arch.hidden_size
    ffn = arch.moe_ffn_hidden_size * arch.moe_router_topk if arch.is_moe else arch.ffn_hidden_size
    qkv = (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.kv_channels
    return tokens * dtype_bytes(dtype) * (5 * h + (qkv + 2 * h + 4 * ffn) / layout.tp)


def _score_bytes(
    arch: ModelArchitecture, layout: ParallelLayout, tokens: int, sequence: int, attention: AttentionKind
) -> float:
    """Attention scores + probabilities of a micro-batch when the attention materialises them."""
    if attention != "local":
        return 0.0
    sequence = min(sequence, tokens)
    rows = max(tokens // sequence, 1)
    return rows * (arch.num_attention_heads / layout.tp) * sequence * sequence * 4 * 2


def unique_storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once): what a
    rank really holds, to check a plan's estimate against."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def load_architecture(checkpoint: str, shapes_dir: Optional[str] = None) -> ModelArchitecture:
    """A model's architecture from ``<checkpoint>/hf/config.json``, or, when the checkpoint is not
    here (planning a cluster job on a laptop), from ``<shapes_dir>/<checkpoint name>.json``."""
    hf_config = Path(checkpoint) / "hf" / "config.json"
    if hf_config.is_file():
        return ModelArchitecture.from_pretrained(hf_config.parent)
    if shapes_dir is not None:
        shape = Path(shapes_dir) / f"{Path(checkpoint).name}.json"
        if shape.is_file():
            return ModelArchitecture.from_hf_config(read_json(shape), source=str(shape))
        raise FileNotFoundError(f"{checkpoint}: no {hf_config} and no shape file {shape}")
    raise FileNotFoundError(
        f"{checkpoint}: no {hf_config}; convert the model first or pass --model-shapes DIR "
        "with <checkpoint name>.json config files"
    )


def dense_dtype(dtype: Optional[str], arch: ModelArchitecture) -> str:
    """A model's parameter dtype: the configured one, else the checkpoint's (float32 if unknown)."""
    name = dtype or arch.torch_dtype
    return name if name in _DTYPE_BYTES else "float32"
