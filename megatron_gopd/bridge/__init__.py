"""HF <-> Megatron weights: the parameter map, sliced loading, streaming export, checkpoints."""

from megatron_gopd.bridge.safetensors_io import CheckpointError, SafetensorsReader, ShardedSafetensorsWriter
from megatron_gopd.bridge.weights import check_hf_checkpoint, export_hf_weights, load_hf_weights

__all__ = ["CheckpointError", "SafetensorsReader", "ShardedSafetensorsWriter", "check_hf_checkpoint",
           "export_hf_weights", "load_hf_weights"]
