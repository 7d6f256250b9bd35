"""What a model *is*, read once from its Hugging Face ``config.json``.

`ModelArchitecture` is the single place that holds a model's shape. The Megatron config, the layer
spec, the weight bridge and the parallel-size checks all read it; none of them reads config.json.

Supported families: Qwen3 dense (``Qwen3ForCausalLM``), Qwen3-MoE (``Qwen3MoeForCausalLM``) and
Llama 3 (``LlamaForCausalLM``, including Llama 3.1-style RoPE scaling). Any field these families may
carry that the Megatron model would not reproduce exactly raises `UnsupportedModelError` naming it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from megatron_gopd.config import read_json

# HF architecture name -> family name used by the bridge and the builders.
FAMILIES: dict[str, str] = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "LlamaForCausalLM": "llama",
}
_MODEL_TYPES = {"qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "llama": "llama"}

# Megatron pads the vocabulary to a multiple of this times the tensor-parallel size.
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128


class UnsupportedModelError(ValueError):
    """A model config this package cannot reproduce exactly; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelArchitecture:
    """The shape and numerics of a decoder-only model, independent of how it is parallelised."""

    family: str
    """One of ``qwen3``, ``qwen3_moe``, ``llama``."""
    hf_architecture: str
    """The HF class name, e.g. ``Qwen3ForCausalLM``; written back on export."""
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    """Dense MLP width (``intermediate_size``)."""
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (GQA); equals ``num_attention_heads`` for plain multi-head attention."""
    kv_channels: int
    """Per-head width (``head_dim``); Qwen3 uses 128 regardless of hidden / heads."""
    vocab_size: int
    """The real vocabulary (rows of the HF embedding); Megatron pads it, see `padded_vocab_size`."""
    max_position_embeddings: int
    norm_epsilon: float
    rope_theta: float
    rope_scaling_factor: Optional[float]
    """Llama 3.1-style RoPE scaling factor, or None for plain RoPE."""
    qk_layernorm: bool
    tie_word_embeddings: bool
    init_std: float
    num_experts: Optional[int] = None
    """Routed experts per MoE layer; None for dense models."""
    moe_router_topk: int = 0
    moe_ffn_hidden_size: Optional[int] = None
    moe_norm_topk_prob: bool = True
    """Renormalise the top-k router probabilities (Qwen3-MoE's ``norm_topk_prob``)."""
    moe_aux_loss_coeff: float = 0.0
    torch_dtype: str = "float32"
    """The dtype the HF checkpoint was saved in; used when exporting back."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    def padded_vocab_size(self, tensor_parallel_size: int) -> int:
        """The vocabulary rounded up to a multiple of 128 x TP, as Megatron lays it out."""
        multiple = MAKE_VOCAB_SIZE_DIVISIBLE_BY * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    @classmethod
    def from_pretrained(cls, hf_dir: str | Path) -> "ModelArchitecture":
        """Read ``<hf_dir>/config.json``; raises FileNotFoundError / UnsupportedModelError."""
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {hf_dir}: expected a Hugging Face model directory")
        config = read_json(path)
        if not isinstance(config, dict):
            raise UnsupportedModelError(f"{path}: expected a JSON object, got {type(config).__name__}")
        return cls.from_hf_config(config, source=str(path))

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelArchitecture":
        """Translate a HF config dict; every unsupported field is reported in one error."""
        return _parse(hf, source)

    def validate_parallel(self, tp: int = 1, pp: int = 1, ep: int = 1, etp: Optional[int] = None) -> None:
        """Check that the model can be split over this grid; raise ValueError naming the field."""
        etp = tp if etp is None else etp
        problems = []
        for size_name, size in (
            ("tensor_parallel", tp),
            ("pipeline_parallel", pp),
            ("expert_parallel", ep),
            ("expert_tensor_parallel", etp),
        ):
            if size < 1:
                problems.append(f"{size_name} must be >= 1, got {size}")
        if not problems:
            checks = [
                ("num_attention_heads", self.num_attention_heads, "tensor_parallel", tp),
                ("num_key_value_heads", self.num_query_groups, "tensor_parallel", tp),
                ("intermediate_size", self.ffn_hidden_size, "tensor_parallel", tp),
                ("num_hidden_layers", self.num_layers, "pipeline_parallel", pp),
            ]
            if self.is_moe:
                checks += [
                    ("num_experts", self.num_experts, "expert_parallel", ep),
                    ("moe_intermediate_size", self.moe_ffn_hidden_size, "expert_tensor_parallel", etp),
                ]
            elif ep != 1:
                problems.append(f"expert_parallel={ep} but the model has no experts")
            for field, value, size_name, size in checks:
                if value % size:
                    problems.append(f"{field}={value} is not divisible by {size_name}={size}")
        if problems:
            raise ValueError(
                f"{self.hf_architecture} cannot be split this way: "
                + "; ".join(problems)
                + f" (valid tensor_parallel sizes for this model: {', '.join(map(str, self.valid_tp_sizes()))})"
            )

    def valid_tp_sizes(self, limit: int = 64) -> list[int]:
        """Tensor-parallel sizes up to `limit` that split the heads, KV heads and MLP evenly (a real
        model's head counts often rule out 2: SmolLM2-135M has 9 / 3 heads, so only 1 and 3)."""
        fields = [self.num_attention_heads, self.num_query_groups, self.ffn_hidden_size]
        return [tp for tp in range(1, limit + 1) if all(value % tp == 0 for value in fields)]


def _rope(hf: dict[str, Any], problems: list[str]) -> tuple[float, Optional[float]]:
    """RoPE base and Llama-3 scaling factor, from either the classic or the transformers-5 layout."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = (scaling or params).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        problems.append(
            f"rope type {rope_type!r} (rope_scaling / rope_parameters) is not supported; supported: default, llama3"
        )
        return float(theta), None
    fields = scaling or params
    # Megatron's Llama-3 scaling hard-codes these three values (rotary_pos_embedding._apply_scaling).
    for key, expected in (
        ("low_freq_factor", 1.0),
        ("high_freq_factor", 4.0),
        ("original_max_position_embeddings", 8192),
    ):
        if float(fields.get(key, expected)) != float(expected):
            problems.append(f"rope_scaling.{key}={fields.get(key)} is not supported (Megatron uses {expected})")
    return float(theta), float(fields.get("factor", 8.0))


def _parse(hf: dict[str, Any], source: str) -> ModelArchitecture:
    problems: list[str] = []
    architectures = hf.get("architectures") or []
    arch_name = architectures[0] if architectures else None
    family = FAMILIES.get(arch_name) if arch_name else _MODEL_TYPES.get(hf.get("model_type", ""))
    if family is None:
        raise UnsupportedModelError(
            f"{source}: architectures={architectures} / model_type={hf.get('model_type')!r} is not "
            f"supported; supported: {', '.join(FAMILIES)}"
        )
    arch_name = arch_name or next(k for k, v in FAMILIES.items() if v == family)

    def need(key: str) -> Any:
        if key not in hf:
            problems.append(f"required field {key!r} is missing")
            return 0
        return hf[key]

    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} is not supported (supported: 'silu')")
    if hf.get("attention_bias", False):
        problems.append("attention_bias=true is not supported")
    if hf.get("mlp_bias", False):
        problems.append("mlp_bias=true is not supported")
    if hf.get("use_sliding_window", False):
        problems.append("use_sliding_window=true is not supported")
    sliding = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
    if sliding:
        problems.append(f"layer_types contains {sorted(set(sliding))}; only full_attention is supported")
    if hf.get("attention_dropout", 0.0):
        problems.append(f"attention_dropout={hf['attention_dropout']} is not supported (must be 0)")
    rope_theta, rope_factor = _rope(hf, problems)

    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    head_dim = hf.get("head_dim") or (hidden // heads if heads else 0)
    moe: dict[str, Any] = {}
    if family == "qwen3_moe":
        if hf.get("mlp_only_layers"):
            problems.append(f"mlp_only_layers={hf['mlp_only_layers']} is not supported (all layers must be MoE)")
        if hf.get("decoder_sparse_step", 1) != 1:
            problems.append(f"decoder_sparse_step={hf['decoder_sparse_step']} is not supported (must be 1)")
        if hf.get("shared_expert_intermediate_size"):
            problems.append("shared_expert_intermediate_size is not supported (Qwen3-MoE has no shared expert)")
        # transformers 5 writes `num_local_experts`; checkpoints on the hub say `num_experts`.
        experts = hf.get("num_experts", hf.get("num_local_experts"))
        if experts is None:
            problems.append("required field 'num_experts' (or 'num_local_experts') is missing")
        moe = dict(
            num_experts=experts or 0,
            moe_router_topk=need("num_experts_per_tok"),
            moe_ffn_hidden_size=need("moe_intermediate_size"),
            # transformers' default when the field is absent
            moe_norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)),
        )
    arch = ModelArchitecture(
        family=family,
        hf_architecture=arch_name,
        num_layers=need("num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=hf.get("intermediate_size", 0),
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=head_dim,
        vocab_size=need("vocab_size"),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling_factor=rope_factor,
        qk_layernorm=family in ("qwen3", "qwen3_moe"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        **moe,
    )
    sizes = {
        "num_hidden_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.kv_channels,
        "vocab_size": arch.vocab_size,
    }
    if arch.is_moe:
        sizes.update(
            num_experts=arch.num_experts,
            num_experts_per_tok=arch.moe_router_topk,
            moe_intermediate_size=arch.moe_ffn_hidden_size,
        )
    else:
        sizes["intermediate_size"] = arch.ffn_hidden_size
    for key, value in sizes.items():
        if key in hf and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            problems.append(f"{key}={value!r} must be a positive integer")
    if not problems and arch.num_attention_heads % arch.num_query_groups:
        problems.append(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={arch.num_query_groups}")
    if problems:
        raise UnsupportedModelError(f"{source} ({arch_name}): " + "; ".join(problems))
    return arch
