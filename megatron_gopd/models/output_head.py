"""Let a GPTModel return its final hidden states instead of logits, keeping the output weight.

Log-probs are then computed from the hidden states and the output weight chunk by chunk
(`megatron_gopd.logprobs.token_logprobs_from_hidden`), so full-vocabulary logits never exist.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


class OutputHead:
    """Lets GPTModel return its final hidden states instead of logits, and keeps the head's weight.

    Within `returning_hidden_states()` the output layer passes its input through (gathered over
    the sequence under sequence parallelism) and records the weight it would have used (the
    embedding when tied), so the loss can compute log-probs chunk by chunk from both
    (`token_logprobs_from_hidden`). Only the last pipeline stage has an output layer.
    """

    def __init__(self, model) -> None:
        self.layer = getattr(model, "output_layer", None)
        self.weight: Optional[torch.Tensor] = None

    @contextlib.contextmanager
    def returning_hidden_states(self) -> Iterator[None]:
        """Within the block the model returns its final hidden states (``[s, b, h]``), not logits."""
        layer = self.layer
        if layer is None:  # not the last pipeline stage: nothing to change
            yield
            return
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        def pass_through(hidden, weight=None, runtime_gather_output=None):
            self.weight = layer.weight if weight is None else weight
            if layer.sequence_parallel:
                # The log-prob kernel all-reduces the hidden gradient over TP itself, so the
                # gather's backward must only split it (not reduce-scatter it again).
                hidden = gather_from_sequence_parallel_region(
                    hidden, tensor_parallel_output_grad=False, group=layer.tp_group
                )
            return hidden, None

        layer.forward = pass_through
        try:
            yield
        finally:
            del layer.forward  # back to the class's forward
