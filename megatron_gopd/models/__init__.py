"""HF config -> Megatron model: `ModelArchitecture` (what a model is) and the builders."""

from megatron_gopd.models.architecture import FAMILIES, ModelArchitecture, UnsupportedModelError
from megatron_gopd.models.builder import ModelConfig, ParallelLayout, build_gpt_model, layer_spec, transformer_config

__all__ = ["FAMILIES", "ModelArchitecture", "ModelConfig", "ParallelLayout", "UnsupportedModelError",
           "build_gpt_model", "layer_spec", "transformer_config"]
