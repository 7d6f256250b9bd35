"""The Megatron-native rollout engine: batched, KV-cached sampling from the student's own model.

`MegatronRolloutEngine` generates with the student's Megatron `GPTModel` in place (no weight copy),
on any tensor / pipeline-parallel layout, on CPU (gloo) and GPU alike.

What it takes from megatron-core (0.16):

* `StaticInferenceContext`: the KV cache. Every attention layer stores its keys and values there,
  so after a prefill each new token costs one incremental forward of one token per sample.
* `GPTInferenceWrapper.run_one_forward_step`: one forward of the whole pipeline. Stages pass
  activations with Megatron's inference p2p helpers, the last stage gathers the vocab-parallel
  logits over TP, and the context's sequence offset advances.

What it does itself, and why megatron-core's `TextGenerationController` / `StaticInferenceEngine`
are not used (read from the 0.16.1 source):

* Sampling. Megatron draws every sample from one shared generator (a sample depends on the rest of
  the batch), rejects top-k together with top-p, samples over the *padded* vocabulary and clamps the
  id, and returns only temperature-1 log-probs of a softmax over the padded vocabulary. Here each sample has its own
  CPU generator seeded by (seed, prompt index, sample index); padded rows never take part; the
  sampler log-prob is of the distribution actually sampled from (temperature, top-k, top-p
  applied and renormalised), and the temperature-1 log-prob over the real vocabulary comes with it.
* Communication. The controller broadcasts the full ``[b, s, vocab]`` logits from the last pipeline
  stage every step, through a helper that asserts CUDA tensors (so it cannot run on CPU). Here the
  sampling rank (last stage, TP rank 0) samples once and broadcasts only the token ids: over its TP
  group, then down every pipeline group. All ranks then hold the same tokens and agree on which
  samples have finished without further messages.
* Finished samples. The controller keeps computing finished sequences until the whole batch is
  done. Here finished samples leave the batch: their rows are removed from the KV cache (an index
  select per layer; `StaticInferenceContext.swap_key_value_dict` only permutes a full batch), so
  later steps run on the live samples only.

Prompts of different lengths, exactly as Megatron's static controller handles them: every sample's
tokens sit at their true positions 0, 1, 2, ... (no padding anywhere, so no padding mask and no
RoPE offset: nothing depends on the attention backend taking an arbitrary mask, which Transformer
Engine's fused attention does not in this path; only the local backend was run so far). The prefill
covers the shortest prompt; after that, one token per step, where a sample whose prompt is not yet
exhausted is fed its next prompt token instead of a sampled one. Results are therefore those of
unpadded single-sample decoding; the price is that the prompt tails beyond the shortest prompt are
processed one token per step. With ``max_batch_size`` the samples are sorted by prompt length
before being cut into batches, which keeps those tails short. The n samples of one prompt share
one prefill: the prompt is run once and its KV rows are copied n times.

Every rank of one model replica (its TP x PP group) must call `generate` with the same request;
this is checked with one small all-reduce. Before generating after an optimizer step, make sure the
parameters are up to date (with the distributed optimizer's overlapped parameter gather, force the
gather first, or the sampler reads stale weights).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_gopd import platform
from megatron_gopd.models import ModelArchitecture
from megatron_gopd.rollout.base import (
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    check_engine_limits,
    validate_request,
)
from megatron_gopd.rollout.replica import check_same_request
from megatron_gopd.rollout.sample_rows import (
    SampleRow,
    append_pending_logprobs,
    pack_logprobs,
    record_token,
    to_rollout_batch,
    unpack_logprobs,
)

# The sampling functions moved to their own module (shared with the fast engine); importable from here too.
from megatron_gopd.rollout.sampling import (
    SampledTokens,
    UniformStreams,
    sample_from_logits,
    sample_seed,
    truncation_mask,
)

_UniformStreams = UniformStreams

logger = logging.getLogger(__name__)

_SAMPLING_ROWS = 128
"""Rows sampled at once on the sampling rank (bounds the [rows, vocab] temporaries)."""

__all__ = [
    "GenerationStats",
    "MegatronRolloutEngine",
    "SampledTokens",
    "sample_from_logits",
    "sample_seed",
    "truncation_mask",
]


# ----------------------------------------------------------------------------------------------
# The engine


@dataclasses.dataclass
class GenerationStats:
    """Timings and counts of the last `generate` call, on this rank (``engine.last_stats``)."""

    samples: int = 0
    """Samples generated (prompts x n)."""
    generated_tokens: int = 0
    """Response tokens generated, EOS / stop tokens included."""
    prefill_seconds: float = 0.0
    """Wall-clock of the prefills (one per batch of samples)."""
    decode_seconds: float = 0.0
    """Wall-clock of the token-by-token steps, sampling and communication included."""
    decode_steps: int = 0
    """Incremental one-token forwards (including those that only fed prompt tails)."""
    prompt_tail_steps: int = 0
    """Decode steps in which no sample generated: every live sample was still reading its prompt."""

    @property
    def seconds(self) -> float:
        """Prefill plus decode wall-clock."""
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per wall-clock second (0 before any generation)."""
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


_Row = SampleRow


def _select_cache_rows(inference_context, rows: torch.Tensor) -> None:
    """Keep (or repeat) the KV-cache rows `rows` of every layer this stage holds, in that order.

    The static context's buffers are ``[max_seq, batch, groups, head_dim]``; attention reads rows
    ``[0, b)`` for an input of b samples, so row k must hold the k-th sample of the next input.
    Only the positions written so far are copied: the rest is written before it is ever read.
    (`StaticInferenceContext.swap_key_value_dict` cannot do this: it only permutes a full batch.)
    """
    filled = inference_context.sequence_len_offset
    for layer, buffers in inference_context.key_value_memory_dict.items():
        selected = []
        for buffer in buffers:  # keys, then values: [max_seq, batch, groups, head_dim]
            kept = buffer.new_empty((buffer.shape[0], rows.numel(), *buffer.shape[2:]))
            kept[:filled] = buffer[:filled].index_select(1, rows.to(buffer.device))
            selected.append(kept)
        inference_context.key_value_memory_dict[layer] = tuple(selected)


class MegatronRolloutEngine(RolloutEngine):
    """Samples from a Megatron `GPTModel` in place, on this rank's TP x PP group.

    Args:
        model: this rank's pipeline stage of the student (a `GPTModel`, possibly wrapped, e.g. in
            DDP), built with ``parallel_output=True``; its weights are read in place.
        arch: the model's architecture (real vocabulary size, context length).
        eos_token_ids: tokens that end a sample with finish reason ``eos`` (e.g. Qwen3's
            ``<|im_end|>`` and ``<|endoftext|>``).
        max_sequence_length: the longest prompt + response, default ``arch.max_position_embeddings``.
        max_batch_size: the most samples decoded together (the KV cache holds this many rows of
            ``max_sequence_length``); larger requests run in several batches, with identical
            results. None: all samples at once.
        pipeline_microbatch_tokens: with pipeline parallelism, forwards over more than this many
            tokens (batch x length) are cut into micro-batches that follow each other through the
            stages (megatron-core's ``inference_batch_times_seqlen_threshold``); None: never.
    """

    def __init__(
        self,
        model,
        arch: ModelArchitecture,
        *,
        eos_token_ids: Sequence[int] = (),
        max_sequence_length: Optional[int] = None,
        max_batch_size: Optional[int] = None,
        pipeline_microbatch_tokens: Optional[int] = None,
    ) -> None:
        from megatron.core.utils import get_attr_wrapped_model, get_model_config

        if isinstance(model, (list, tuple)):
            raise TypeError(
                "pass this rank's single model chunk; virtual pipeline stages (a list of "
                "chunks) are not supported by megatron-core's inference path"
            )
        self.model = model
        self.arch = arch
        self.config = get_model_config(model)
        if self.config.sequence_parallel:
            raise ValueError(
                "the model uses sequence parallelism, which megatron-core's static "
                "KV-cache inference does not support; build the rollout model without it"
            )
        self.eos_token_ids, self.max_sequence_length = check_engine_limits(
            arch.vocab_size, arch.max_position_embeddings, eos_token_ids, max_sequence_length, max_batch_size
        )
        self.max_batch_size = max_batch_size
        self.pipeline_microbatch_tokens = pipeline_microbatch_tokens

        pg_collection = get_attr_wrapped_model(model, "pg_collection")
        self.pg_collection = pg_collection
        self.tp_group, self.pp_group = pg_collection.tp, pg_collection.pp
        self.tp_size, self.pp_size = self.tp_group.size(), self.pp_group.size()
        self.is_last_stage = self.pp_group.rank() == self.pp_size - 1
        # The sampling rank: last pipeline stage, TP rank 0. Broadcast sources are global ranks.
        self.is_sampler = self.is_last_stage and self.tp_group.rank() == 0
        self._tp_source = dist.get_process_group_ranks(self.tp_group)[0]
        self._pp_source = dist.get_process_group_ranks(self.pp_group)[-1]
        self.padded_vocab_size = arch.padded_vocab_size(self.tp_size)
        self.device = platform.device()
        self.last_stats = GenerationStats()
        # (rows, sampler log-probs [g], temperature-1 log-probs [g] or None) per decode step, on
        # the sampling rank's device until the batch of samples is done.
        self._pending_logprobs: list[tuple[list[_Row], torch.Tensor, Optional[torch.Tensor]]] = []

    # ------------------------------------------------------------------------------------------
    # Public API

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> RolloutBatch:
        """Sample ``sampling.n`` responses per prompt; every rank of the replica gets the batch.

        See `RolloutEngine.generate` and the module docstring. Raises ValueError before any
        generation for bad input, and RuntimeError when the ranks of the replica were given
        different requests.
        """
        validate_request(
            prompt_token_ids,
            sampling,
            max_sequence_length=self.max_sequence_length,
            vocab_size=self.arch.vocab_size,
            eos_token_ids=self.eos_token_ids,
        )
        self.last_stats = GenerationStats()
        if len(prompt_token_ids) == 0:
            return RolloutBatch(samples=[])
        prompts = [[int(t) for t in prompt] for prompt in prompt_token_ids]  # plain ints (NumPy ids too)
        self._check_same_request(prompts, sampling)
        rows = [
            _Row(
                sample_id=prompt_index * sampling.n + sample_index,
                prompt_index=prompt_index,
                sample_index=sample_index,
                prompt=prompt,
                budget=min(sampling.max_new_tokens, self.max_sequence_length - len(prompt)),
            )
            for prompt_index, prompt in enumerate(prompts)
            for sample_index in range(sampling.n)
        ]
        streams = None
        if self.is_sampler and not sampling.greedy:
            streams = _UniformStreams([sample_seed(sampling.seed, r.prompt_index, r.sample_index) for r in rows])

        from megatron.core.utils import get_attr_wrapped_model

        was_training = self.model.training
        try:
            with torch.inference_mode(), platform.device_rewrites_paused():
                for chunk in self._chunks(rows):
                    self._generate_chunk(chunk, sampling, streams)
        finally:
            get_attr_wrapped_model(self.model, "set_input_tensor")(None)  # drop the last activation
            self.model.train(was_training)

        batch = to_rollout_batch(rows, sampling)
        stats = self.last_stats
        stats.samples, stats.generated_tokens = len(rows), batch.num_tokens
        logger.info(
            "generated %d samples, %d tokens in %.2f s (%.0f tokens/s; prefill %.2f s, %d decode "
            "steps, %d prompt-tail-only); truncated %.1f%%",
            stats.samples,
            stats.generated_tokens,
            stats.seconds,
            stats.tokens_per_second,
            stats.prefill_seconds,
            stats.decode_steps,
            stats.prompt_tail_steps,
            100 * batch.truncation_rate,
        )
        return batch

    # ------------------------------------------------------------------------------------------
    # One batch of samples

    def _chunks(self, rows: list[_Row]) -> list[list[_Row]]:
        """Cut the samples into batches of at most max_batch_size, similar prompt lengths together."""
        if self.max_batch_size is None or len(rows) <= self.max_batch_size:
            return [rows]
        by_length = sorted(rows, key=lambda r: len(r.prompt))  # stable: a prompt's samples stay adjacent
        return [by_length[i : i + self.max_batch_size] for i in range(0, len(by_length), self.max_batch_size)]

    def _generate_chunk(self, rows: list[_Row], sampling: SamplingParams, streams: Optional[_UniformStreams]) -> None:
        """Generate every sample of `rows` to completion, filling them in place."""
        started = time.perf_counter()
        wrapper, logits, prefill_len = self._prefill(rows)
        self.last_stats.prefill_seconds += time.perf_counter() - started
        started = time.perf_counter()
        self._pending_logprobs = []
        self._decode(rows, wrapper, logits, prefill_len, sampling, streams)
        self._collect_logprobs()
        self.last_stats.decode_seconds += time.perf_counter() - started
        self._share_logprobs(rows, sampling)

    def _prefill(self, rows: list[_Row]) -> tuple[object, Optional[torch.Tensor], int]:
        """A fresh KV cache for `rows`, filled with the first ``prefill_len`` tokens of every prompt.

        ``prefill_len`` is the shortest prompt's length. The n samples of a prompt share its
        prefill: each distinct prompt runs once and its cache row is then repeated.

        Returns the inference wrapper (holding the cache), the logits ``[b, V_padded]`` that
        predict position ``prefill_len`` of every row (last stage only, else None), and
        ``prefill_len``.
        """
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig

        distinct: dict[int, int] = {}  # prompt index -> row of the prefill batch
        for row in rows:
            distinct.setdefault(row.prompt_index, len(distinct))
        distinct_prompts = [next(r.prompt for r in rows if r.prompt_index == p) for p in distinct]
        prefill_len = min(len(p) for p in distinct_prompts)
        slots = max(len(r.prompt) + r.budget for r in rows)  # KV-cache length this batch needs

        context = StaticInferenceContext(max_batch_size=len(distinct_prompts), max_sequence_length=slots)
        wrapper = GPTInferenceWrapper(
            self.model,
            InferenceWrapperConfig(
                hidden_size=self.config.hidden_size,
                params_dtype=self.config.params_dtype,
                inference_batch_times_seqlen_threshold=self.pipeline_microbatch_tokens or -1,
                padded_vocab_size=self.padded_vocab_size,
                inference_max_requests=len(distinct_prompts),
                inference_max_seq_length=slots,
            ),
            inference_context=context,
            pg_collection=self.pg_collection,
        )
        wrapper.prep_model_for_inference()  # eval mode, fresh context

        prefill_tokens = torch.tensor(
            [p[:prefill_len] for p in distinct_prompts], dtype=torch.long, device=self.device
        )  # [U, prefill_len]
        logits = self._forward(wrapper, prefill_tokens, start=0)  # [U, V_padded] (last stage only)
        if len(distinct_prompts) != len(rows):
            prompt_rows = torch.tensor([distinct[r.prompt_index] for r in rows], dtype=torch.long)
            _select_cache_rows(context, prompt_rows)
            if logits is not None:
                logits = logits[prompt_rows.to(logits.device)]  # [b, V_padded]
        context.enable_decode_mode()
        return wrapper, logits, prefill_len

    def _decode(
        self,
        rows: list[_Row],
        wrapper,
        logits: Optional[torch.Tensor],
        slot: int,
        sampling: SamplingParams,
        streams: Optional[_UniformStreams],
    ) -> None:
        """Decide the token at `slot` for every live row, one KV-cached step at a time, until all end.

        A row still inside its prompt takes its own next prompt token; the others sample. Finished
        rows leave the batch (and the KV cache) before the next step.
        """
        stats = self.last_stats
        live = list(rows)  # row k of the KV cache and of `logits` is live[k]
        while True:
            generating = [k for k, row in enumerate(live) if slot >= len(row.prompt)]
            sampled = self._sample(logits, live, generating, sampling, streams) if generating else []
            next_tokens = [row.prompt[slot] if slot < len(row.prompt) else -1 for row in live]
            for k, token in zip(generating, sampled):
                next_tokens[k] = token
                self._record(live[k], token, sampling)
            if not generating:
                stats.prompt_tail_steps += 1
            keep = [k for k, row in enumerate(live) if row.finish_reason is None]
            if not keep:
                return
            if len(keep) < len(live):
                _select_cache_rows(wrapper.inference_context, torch.tensor(keep, dtype=torch.long))
                live = [live[k] for k in keep]
                next_tokens = [next_tokens[k] for k in keep]
            step_tokens = torch.tensor(next_tokens, dtype=torch.long, device=self.device)[:, None]  # [b, 1]
            logits = self._forward(wrapper, step_tokens, start=slot)  # [b, V_padded] (last stage)
            stats.decode_steps += 1
            slot += 1

    def _forward(self, wrapper, tokens: torch.Tensor, start: int) -> Optional[torch.Tensor]:
        """One KV-cached forward of `tokens` ``[b, s]`` at positions ``start .. start + s - 1``.

        Returns the last position's full-vocabulary logits ``[b, V_padded]`` on the last pipeline
        stage (every TP rank), None on the other stages.
        """
        batch, length = tokens.shape
        positions = torch.arange(start, start + length, device=tokens.device).expand(batch, -1)  # [b, s]
        # The attention mask is None: every sample's positions 0..start+s-1 hold real tokens, so
        # the causal mask (prefill) or no mask (one new token) is exact.
        logits = wrapper.run_one_forward_step(
            {"tokens": tokens, "position_ids": positions, "attention_mask": None}
        )  # [b, 1, V_padded]
        return None if logits is None else logits[:, -1, :]

    # ------------------------------------------------------------------------------------------
    # Sampling and communication

    def _sample(
        self,
        logits: Optional[torch.Tensor],
        live: list[_Row],
        generating: list[int],
        sampling: SamplingParams,
        streams: Optional[_UniformStreams],
    ) -> list[int]:
        """Sample the next token of the live rows `generating` on the sampling rank.

        `logits` are the live batch's ``[b_live, V_padded]`` (on the last stage); `generating`
        indexes the rows of `live` that are past their prompt. Returns the sampled ids on every rank.
        """
        rows = [live[k] for k in generating]
        token_ids = None
        if self.is_sampler:
            if len(generating) < logits.shape[0]:  # some rows are still reading their prompts
                logits = logits[torch.tensor(generating, device=logits.device)]  # [g, V_padded]
            if streams is None:  # greedy: no randomness
                uniforms = torch.zeros(len(rows), dtype=torch.float64)
            else:
                uniforms = streams.draw([r.sample_id for r in rows], [len(r.token_ids) for r in rows])
            # Row chunks bound the fp32 / fp64 [rows, V] temporaries (a 150k vocabulary at 1024 rows
            # would need several GB at once).
            parts = [
                sample_from_logits(
                    logits[i : i + _SAMPLING_ROWS], self.arch.vocab_size, sampling, uniforms[i : i + _SAMPLING_ROWS]
                )
                for i in range(0, len(rows), _SAMPLING_ROWS)
            ]
            token_ids = torch.cat([p.token_ids for p in parts]).to(self.device)  # [g]
            # Log-probs stay on the sampling rank's device until the batch is done: reading them
            # back every step would add two host synchronisations per token (one broadcast and one
            # copy per batch instead).
            self._pending_logprobs.append(
                (
                    rows,
                    torch.cat([p.sampler_logprobs for p in parts]),
                    torch.cat([p.logprobs for p in parts]) if sampling.return_logprobs else None,
                )
            )
        token_ids = self._broadcast_from_sampler(token_ids, (len(rows),), torch.long)
        return token_ids.tolist()

    def _collect_logprobs(self) -> None:
        """Append the log-probs kept on the device during decoding to their rows (sampling rank)."""
        pending, self._pending_logprobs = self._pending_logprobs, []
        append_pending_logprobs(pending)

    def _record(self, row: _Row, token: int, sampling: SamplingParams) -> None:
        """Append a sampled token and decide whether the sample has finished."""
        record_token(row, token, self.eos_token_ids, sampling)

    def _broadcast_from_sampler(
        self, tensor: Optional[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """Send the sampling rank's `tensor` to every rank of the replica (TP, then down PP)."""
        if not self.is_sampler:
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
        if self.is_last_stage and self.tp_size > 1:
            dist.broadcast(tensor, src=self._tp_source, group=self.tp_group)
        if self.pp_size > 1:
            dist.broadcast(tensor, src=self._pp_source, group=self.pp_group)
        return tensor

    def _share_logprobs(self, rows: list[_Row], sampling: SamplingParams) -> None:
        """Broadcast the log-probs kept on the sampling rank to the whole replica, once per batch."""
        if self.tp_size * self.pp_size == 1:
            return
        columns = 2 if sampling.return_logprobs else 1
        total = sum(len(r.token_ids) for r in rows)  # known on every rank: tokens were broadcast
        packed = pack_logprobs(rows, sampling.return_logprobs, self.device) if self.is_sampler else None
        packed = self._broadcast_from_sampler(packed, (columns, total), torch.float32)
        if not self.is_sampler:
            unpack_logprobs(rows, packed)

    def _check_same_request(self, prompts: list[list[int]], sampling: SamplingParams) -> None:
        """Fail fast (RuntimeError) when the ranks of this replica were given different requests."""
        check_same_request(prompts, sampling, (self.tp_group, self.pp_group), self.device)
