"""HF config -> Megatron model: `ModelArchitecture` (what a model is) and the builders.

Owns:
    architecture  `ModelArchitecture` from a HF ``config.json`` (Qwen3, Qwen3-MoE, Llama 3)
    builder       `ParallelLayout`, the Megatron `TransformerConfig`, layer spec and `GPTModel`
    norm          the RMSNorm used with sequence parallelism on the local (non-TE) spec

May import: `platform` (device, Transformer Engine availability), torch and megatron-core.
"""

from megatron_gopd.models.architecture import FAMILIES, ModelArchitecture, UnsupportedModelError
from megatron_gopd.models.builder import ModelConfig, ParallelLayout, build_gpt_model, layer_spec, transformer_config

__all__ = [
    "FAMILIES",
    "ModelArchitecture",
    "ModelConfig",
    "ParallelLayout",
    "UnsupportedModelError",
    "build_gpt_model",
    "layer_spec",
    "transformer_config",
]
