"""An RMSNorm for Megatron's local (non-Transformer-Engine) layer spec that allows sequence parallelism.

megatron-core's `WrappedTorchNorm` refuses ``sequence_parallel=True``, and Megatron refuses to train
MoE layers under tensor parallelism without it, so without this module an MoE model could not run at
TP > 1 on CPU. Under sequence parallelism each TP rank normalises its own slice of the sequence, so
its weight gradient is partial; the ``sequence_parallel`` attribute is what Megatron's
`finalize_model_grads` looks for to all-reduce it across the TP group (as Transformer Engine's and
apex's norms do).
"""

from __future__ import annotations

import torch


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """`torch.nn.RMSNorm` with Megatron's norm constructor signature and sequence-parallel marking."""

    def __init__(
        self,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ) -> None:
        if config.normalization != "RMSNorm" or zero_centered_gamma or config.layernorm_zero_centered_gamma:
            raise ValueError(
                "SequenceParallelRMSNorm implements plain RMSNorm only "
                f"(got normalization={config.normalization!r}, zero-centred gamma)"
            )
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
