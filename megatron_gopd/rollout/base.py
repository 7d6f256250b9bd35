"""The rollout-engine interface: sampling parameters, the batch of rollouts, and request checks.

Every engine (the Megatron-native sampler in `megatron_engine`, the vLLM backend in `vllm_engine`) takes token-id
prompts and a `SamplingParams`, and returns a `RolloutBatch`: for every sample its response token
ids, the sampler's log-prob of every sampled token, optionally the temperature-1 log-probs, and why
it ended. Requests are checked by `validate_request` before any generation starts, so bad input
fails with a clear `ValueError` on every rank instead of hanging a collective halfway through.

Conventions:

* Samples are ordered prompt-major: prompt 0's samples 0..n-1, then prompt 1's, and so on.
* The token that ends a sample (an EOS or stop token) is part of its response and has log-probs:
  the trainer must train on the real EOS (shared/pitfalls.md), and stop tokens are kept so that
  response tokens and log-probs always align one to one.
* ``sampler_logprobs`` are of the distribution actually sampled from: the softmax of
  ``logits / temperature`` restricted to the top-k / top-p set and renormalised. Greedy decoding
  samples from a point mass, so its sampler log-probs are 0. ``logprobs`` are always at temperature
  1 over the full (real) vocabulary, which is what the G-OPD loss scores.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
from typing import Iterator, Literal, Optional, Sequence

import torch

FinishReason = Literal["stop", "eos", "length"]
"""Why a sample ended: a stop token, an EOS token, or the length limit (max_new_tokens / context)."""

FINISH_REASONS: tuple[str, ...] = ("stop", "eos", "length")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample responses; checked on construction (ValueError naming the field).

    The paper's training setting is the default: temperature 1, no top-p / top-k truncation
    (truncation renormalises the sampled distribution and biases importance weights unless training
    applies the same mask; see shared/pitfalls.md).
    """

    temperature: float = 1.0
    """Softmax temperature (logits are divided by it); 0 selects greedy (argmax) decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
    top_p (after top-k); in (0, 1], 1 disables it."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables it, 1 is greedy."""
    max_new_tokens: int = 256
    """Most tokens generated per sample (fewer when the context runs out); >= 1."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a sample with finish reason ``stop`` (the engine's EOS ids give ``eos``)."""
    n: int = 1
    """Samples per prompt; >= 1."""
    seed: int = 0
    """Base seed; sample j of prompt i draws from a generator seeded by (seed, i, j), so a sample
    does not depend on what else is in the batch. Use a different seed per data-parallel replica
    and per step."""
    return_logprobs: bool = True
    """Also return the temperature-1, untruncated log-probs of the sampled tokens (for the loss)."""

    def __post_init__(self) -> None:
        # Accept any iterable of ints (a YAML list, a list) but store a hashable tuple.
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        problems = []
        if not (
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0
        ):
            problems.append(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        for name in ("top_k", "max_new_tokens", "n", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{name} must be an int, got {value!r}")
        if not problems:
            if self.top_k < 0:
                problems.append(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
            if self.max_new_tokens < 1:
                problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
            if self.n < 1:
                problems.append(f"n (samples per prompt) must be >= 1, got {self.n}")
            if self.seed < 0:
                problems.append(f"seed must be >= 0, got {self.seed}")
        bad_stops = [t for t in self.stop_token_ids if not _is_token_id(t) or t < 0]
        if bad_stops:
            problems.append(f"stop_token_ids must be non-negative ints, got {bad_stops}")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0 or self.top_k == 1


@dataclasses.dataclass
class RolloutSample:
    """One sampled response to one prompt."""

    prompt_index: int
    """Index of the prompt in the list given to `RolloutEngine.generate`."""
    sample_index: int
    """Which of the prompt's n samples this is (0..n-1)."""
    token_ids: list[int]
    """The response tokens, including the EOS / stop token that ended it."""
    sampler_logprobs: list[float]
    """Log-prob of each response token under the distribution it was sampled from."""
    logprobs: Optional[list[float]]
    """Temperature-1 full-vocabulary log-prob of each response token, or None if not asked for."""
    finish_reason: FinishReason

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass
class RolloutBatch:
    """All samples of one `generate` call, prompt-major (prompt 0's n samples first)."""

    samples: list[RolloutSample]

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[RolloutSample]:
        return iter(self.samples)

    def __getitem__(self, index: int) -> RolloutSample:
        return self.samples[index]

    @property
    def response_lengths(self) -> list[int]:
        """Number of response tokens of each sample."""
        return [len(s.token_ids) for s in self.samples]

    @property
    def num_tokens(self) -> int:
        """Total response tokens in the batch."""
        return sum(self.response_lengths)

    @property
    def truncation_rate(self) -> float:
        """Fraction of samples that hit the length limit (0 for an empty batch)."""
        if not self.samples:
            return 0.0
        return sum(s.finish_reason == "length" for s in self.samples) / len(self.samples)

    def padded(self, pad_token_id: int) -> dict[str, torch.Tensor]:
        """Right-padded tensors for training: one row per sample, ``L`` = the longest response.

        Returns ``token_ids`` [N, L] (int64, padded with `pad_token_id`), ``sampler_logprobs``
        [N, L] and, when present, ``logprobs`` [N, L] (fp32, padded with 0), and ``response_mask``
        [N, L] (bool). The mask comes from the response lengths, never from comparing tokens with
        the pad id (Qwen3's pad id is also one of its EOS ids).
        """
        lengths = self.response_lengths
        rows, width = len(lengths), max(lengths, default=0)
        token_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)  # [N, L]
        sampler_logprobs = torch.zeros((rows, width), dtype=torch.float32)  # [N, L]
        have_logprobs = bool(self.samples) and all(s.logprobs is not None for s in self.samples)
        logprobs = torch.zeros((rows, width), dtype=torch.float32) if have_logprobs else None
        for row, sample in enumerate(self.samples):
            length = lengths[row]
            token_ids[row, :length] = torch.tensor(sample.token_ids, dtype=torch.long)
            sampler_logprobs[row, :length] = torch.tensor(sample.sampler_logprobs, dtype=torch.float32)
            if logprobs is not None:
                logprobs[row, :length] = torch.tensor(sample.logprobs, dtype=torch.float32)
        response_mask = torch.arange(width)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]
        out = {"token_ids": token_ids, "sampler_logprobs": sampler_logprobs, "response_mask": response_mask}
        if logprobs is not None:
            out["logprobs"] = logprobs
        return out


def validate_request(
    prompt_token_ids: Sequence[Sequence[int]],
    sampling: SamplingParams,
    *,
    max_sequence_length: int,
    vocab_size: int,
    eos_token_ids: Sequence[int] = (),
) -> None:
    """Check a generation request before any work; raise ValueError / TypeError naming the problem.

    Every prompt must be non-empty, hold token ids in ``[0, vocab_size)`` and be shorter than
    `max_sequence_length` (at least one position must be left to generate into); stop and EOS ids
    must lie in the vocabulary.
    """
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    if isinstance(prompt_token_ids, (str, bytes, torch.Tensor)) or not isinstance(prompt_token_ids, Sequence):
        raise TypeError(
            f"prompt_token_ids must be a list of token-id lists (one per prompt), got {type(prompt_token_ids).__name__}"
        )
    problems = []
    for index, prompt in enumerate(prompt_token_ids):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            problems.append(f"prompt {index} is a {type(prompt).__name__}, not a list of token ids")
        elif len(prompt) == 0:
            problems.append(f"prompt {index} is empty (a prompt needs at least one token)")
        elif len(prompt) >= max_sequence_length:
            problems.append(
                f"prompt {index} has {len(prompt)} tokens but the context is "
                f"{max_sequence_length} tokens: it must be shorter, to leave room for a response"
            )
        else:
            bad = [t for t in prompt if not _is_token_id(t) or not 0 <= t < vocab_size]
            if bad:
                problems.append(f"prompt {index} has token ids outside [0, {vocab_size}): {bad[:5]}")
        if len(problems) >= 5:  # enough to act on; do not flood the message
            break
    for name, ids in (("stop_token_ids", sampling.stop_token_ids), ("eos_token_ids", tuple(eos_token_ids))):
        outside = [t for t in ids if not 0 <= t < vocab_size]
        if outside:
            problems.append(f"{name} {outside} are outside the vocabulary [0, {vocab_size})")
    if problems:
        raise ValueError("invalid generation request: " + "; ".join(problems))


def check_engine_limits(
    vocab_size: int,
    max_position_embeddings: int,
    eos_token_ids: Sequence[int],
    max_sequence_length: Optional[int],
    max_batch_size: Optional[int],
) -> tuple[tuple[int, ...], int]:
    """An engine's construction arguments checked (ValueError naming the argument).

    Returns the EOS ids as a tuple of ints and the context length (`max_sequence_length`, default
    `max_position_embeddings`).
    """
    eos = tuple(int(t) for t in eos_token_ids)
    outside = [t for t in eos if not 0 <= t < vocab_size]
    if outside:
        raise ValueError(f"eos_token_ids {outside} are outside the vocabulary [0, {vocab_size})")
    context = max_sequence_length or max_position_embeddings
    if not 1 < context <= max_position_embeddings:
        raise ValueError(
            f"max_sequence_length={context} must be in (1, max_position_embeddings={max_position_embeddings}]"
        )
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
    return eos, context


def _is_token_id(value: object) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class RolloutEngine(abc.ABC):
    """Generates responses for token-id prompts.

    In a distributed job every rank of one model replica (its tensor- and pipeline-parallel group)
    calls `generate` with the same prompts and sampling parameters, and every one of them receives
    the same `RolloutBatch`.
    """

    @abc.abstractmethod
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> RolloutBatch:
        """Sample ``sampling.n`` responses to every prompt; see the module docstring for the layout.

        Raises ValueError (before any generation) for empty or too-long prompts, out-of-vocabulary
        ids, or invalid sampling parameters.
        """

    def release(self) -> None:
        """Free what generation holds on the device (KV cache, CUDA graphs; vLLM: its weights too,
        in sleep mode) before training. The next `generate` (after `sync_weights` for engines that
        hold a weight copy) brings it back. Engines that hold nothing between calls need not
        override it."""

    holds_weight_copy: bool = False
    """True for engines that sample from their own copy of the weights (vLLM): the trainer must
    call `sync_weights` after every optimizer step. False for engines that read the model in place."""

    def sync_weights(self) -> None:
        """Make the next `generate` sample from the model's current weights (collective: every rank
        calls it). Nothing to do for engines that read the model in place."""

    def close(self) -> None:
        """Release the engine (every rank together, after the job's last collective). Nothing to
        do for engines that own no resources beyond the model."""
