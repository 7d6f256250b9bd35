"""HF <-> Megatron weights: the parameter map, sliced loading, streaming export, checkpoints.

Owns:
    mapping         the HF <-> Megatron parameter map per model family (fused QKV, gate/up, experts)
    weights         sliced loading of HF safetensors into a parallel model, streaming export back
    safetensors_io  reading and writing HF safetensors directories (single file or sharded + index)
    convert         `gopd-convert`: HF -> Megatron checkpoint and back

May import: `models`, `platform`, `checkpointing` (convert only), torch, megatron-core and safetensors.
`safetensors_io` imports only torch and safetensors, so ExPO and tools can use it cheaply.
"""

from megatron_gopd.bridge.safetensors_io import CheckpointError, SafetensorsReader, ShardedSafetensorsWriter
from megatron_gopd.bridge.weights import check_hf_checkpoint, export_hf_weights, load_hf_weights

__all__ = [
    "CheckpointError",
    "SafetensorsReader",
    "ShardedSafetensorsWriter",
    "check_hf_checkpoint",
    "export_hf_weights",
    "load_hf_weights",
]
