"""Vocab-parallel token log-probs, entropy and full-vocabulary reverse KL, memory-bounded.

Every model in a G-OPD step (student, teachers, reference) ends in an LM head whose output is split
over the tensor-parallel (TP) group along the vocabulary: TP rank r holds the contiguous rows
``[r * V/tp, (r + 1) * V/tp)`` of the (padded) vocabulary. This module turns such a head into
per-token log-probs of given target tokens, per-token entropies and, for the full-vocabulary
distillation variant, the exact per-token reverse KL to the G-OPD target distribution, without
ever holding a full-vocabulary fp32 tensor for the whole sequence:

* the sequence is processed in chunks of about ``chunk_size`` tokens, each chunk in fp32;
* exact softmax statistics across shards come from one max and one sum all-reduce per chunk over
  ``tp_group`` (``None`` means no tensor parallelism);
* custom ``torch.autograd.Function``s save only per-token statistics ([s, b] tensors) and recompute
  each chunk's logits in backward.

Two entry points per quantity:

* ``*_from_logits``: the input is the vocab-parallel logits ``[s, b, V/tp]`` (any float dtype). Used
  by samplers and tests; the logits and their gradient (same size, same dtype) exist, but no fp32
  copy of them does.
* ``token_logprobs_from_hidden``: the path that scales (full logits never exist): the input is the final
  hidden states ``[s, b, h]`` (full, identical on every TP rank) and the vocab-parallel output
  weight ``[V/tp, h]`` (``model.shared_embedding_or_output_weight()`` when embeddings are tied).
  The logits only ever exist one chunk at a time; backward accumulates the weight gradient chunk
  by chunk and all-reduces the hidden-state gradient over TP, because each rank only sees its
  vocabulary shard.

Conventions shared by every function here:

* Layout is Megatron's sequence-major ``[s, b, ...]``; outputs are ``[s, b]`` (or ``[s, b, k]`` for
  ``k`` targets per token), always fp32.
* ``temperature`` divides the logits before the softmax (``z / T``), as the sampler does.
* ``vocab_size`` is the real (unpadded) vocabulary. Megatron pads the vocabulary to a multiple of
  ``make_vocab_size_divisible_by * tp``; rows at or beyond ``vocab_size`` are excluded from every
  softmax, which is the same as masking them to -inf, and receive zero gradient. Targets must lie in
  ``[0, vocab_size)``; a target in the padding is not detected (checking would cost a device sync).
* ``chunk_size`` is a number of tokens (``s * b`` positions) per chunk, rounded down to whole
  sequence positions (at least one). ``None`` picks chunks of about ``DEFAULT_CHUNK_ELEMENTS`` fp32
  logits, i.e. ~256 MiB per chunk-sized temporary; a chunk needs two or three such temporaries.

Modules:
    shared        the vocabulary shard, per-chunk softmax math and gradient, chunk sizing, checks
    from_logits   `token_logprobs_from_logits`, `topk_logprobs_from_logits`
    from_hidden   `token_logprobs_from_hidden`
    reverse_kl    `full_vocab_reverse_kl`

May import: torch only (pure functions on tensors and a process group; no model, no megatron-core).
"""

from megatron_gopd.logprobs.from_hidden import token_logprobs_from_hidden
from megatron_gopd.logprobs.from_logits import token_logprobs_from_logits, topk_logprobs_from_logits
from megatron_gopd.logprobs.reverse_kl import full_vocab_reverse_kl
from megatron_gopd.logprobs.shared import DEFAULT_CHUNK_ELEMENTS

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "token_logprobs_from_logits",
    "token_logprobs_from_hidden",
    "full_vocab_reverse_kl",
    "topk_logprobs_from_logits",
]
