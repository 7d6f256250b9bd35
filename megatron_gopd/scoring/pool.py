"""The teacher / reference pool: forward-only Megatron models, each with its own parallel layout.

`ScoringPool` holds the models of a `ScoringPlan` (`megatron_gopd.scoring.plan`) and scores the
student's rollouts with them (see the package docstring for the calling sequence).

Layouts. Every rank of the job holds its share of every model, through the model's own process
groups (`megatron_gopd.parallel.build_grid`); groups with the same members are created once and
shared by every model of the pool. Models with the same checkpoint, layout and dtype share one set
of weights.

Redistribution. Requests arrive in the student's data-parallel layout (ranks of one student
model-parallel group pass identical lists). For each model:

* in place: when the model's replicas are exactly the student's model-parallel groups (same TP x PP
  ranks, e.g. the ``student_init`` reference, or a teacher at the student's layout), each replica
  scores its own shard; the last pipeline stage broadcasts the result to the other stages.
* redistributed: one rank per student shard contributes its token ids to an all-gather; every rank
  then knows the whole batch and the same deterministic assignment of sequences to the model's
  replicas (`batching.balance_by_tokens`: longest first, to the replica with the fewest tokens).
  Each replica's last-stage TP rank 0 contributes its log-probs to a second all-gather, from which
  every rank takes its own.

Each replica runs its share forward-only (`megatron_gopd.scoring.forward`).

Chat templates. Each model renders prompts with its own chat template (a Qwen3 student with
``enable_thinking=False`` adds an empty think block; an Instruct-2507 teacher does not). A model
whose template differs from the student's (or that sets its own ``chat_template_kwargs``) renders
the prompt's ``messages`` with its own tokenizer; the student's response ids are appended unchanged
(never re-tokenised), and the response's log-probs are read at that model's prompt length.

Memory. ``offload_to_cpu`` (GPU only) keeps every forward-only model's weights in host memory and
moves one model at a time to the GPU for its forward passes, so the pool's GPU footprint is one
model plus activations; the price is one host-to-device copy of each model's weights per
`score` call (about weight bytes / PCIe bandwidth). On CPU it does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_gopd import platform
from megatron_gopd.batching import balance_by_tokens, pack_by_tokens
from megatron_gopd.collectives import agree, all_gather_varlen, check_same_within_groups, fingerprint
from megatron_gopd.data import render_prompt_ids
from megatron_gopd.models import ParallelLayout
from megatron_gopd.parallel import (
    GroupFactory,
    ModelGrid,
    build_grid,
    check_megatron_layout,
    replica_partition,
    same_partition,
)
from megatron_gopd.scoring.config import ScoringConfig, UnroutedDomainError
from megatron_gopd.scoring.forward import (
    ScoredSequence,
    collate_forward,
    decode_sequences,
    encode_sequences,
    load_pool_model,
    run_forward,
)
from megatron_gopd.scoring.plan import ModelPlan, ScoringPlan, load_tokenizer, validate_scoring_config

logger = logging.getLogger(__name__)

__all__ = ["ModelStats", "SampleScores", "ScoreRequest", "ScoringPool"]


# ----------------------------------------------------------------------------------------------
# Requests and results


@dataclass
class ScoreRequest:
    """One student rollout, on the rank that generated it."""

    domain: str
    """The prompt's domain: selects the teacher."""
    prompt_ids: list[int]
    """The prompt rendered with the student's chat template (``PromptRecord.input_ids``)."""
    response_ids: list[int]
    """The sampled response tokens, exactly as generated (never re-tokenised)."""
    messages: Optional[list[dict]] = None
    """The prompt as chat messages (``PromptRecord.messages``); needed by any model whose chat
    template differs from the student's."""


@dataclass
class SampleScores:
    """The pool's log-probs for one request, aligned with its ``response_ids``."""

    teacher: str
    """Name of the teacher that scored it."""
    lam: float
    """That teacher's reward scale."""
    teacher_logprobs: torch.Tensor
    """``[len(response_ids)]`` fp32 log pi*(y_t) of each sampled response token."""
    ref_logprobs: Optional[torch.Tensor]
    """``[len(response_ids)]`` fp32 log pi_ref(y_t) from the teacher's reference; None when the
    teacher has none or ``lam == 1`` (the reference then drops out of the advantage)."""
    teacher_topk_ids: Optional[torch.Tensor] = None
    """With ``score(..., topk=k)``: ``[len(response_ids), k]`` int64, the teacher's k most likely
    next tokens at each response position (most likely first); else None."""
    teacher_topk_logprobs: Optional[torch.Tensor] = None
    """``[len(response_ids), k]`` fp32 the teacher's log-probs of those tokens (full-vocabulary
    log-softmax values, not renormalised over the k)."""
    ref_topk_logprobs: Optional[torch.Tensor] = None
    """``[len(response_ids), k]`` fp32 the reference's log-probs of the teacher's top-k tokens;
    None exactly when `ref_logprobs` is."""


@dataclass
class ModelStats:
    """What one pool model computed on this rank's replica, summed over `ScoringPool.score` calls."""

    replica: int
    """This rank's data-parallel replica of the model."""
    num_replicas: int
    redistributed: bool
    """Whether requests are redistributed to this model's replicas (False: its replicas are the
    student's model-parallel groups, each scores its own shard)."""
    sequences: int = 0
    """Sequences this replica ran (a teacher only ever gets its own domains' prompts)."""
    tokens: int = 0
    """Real tokens (prompt + response) of those sequences."""
    padded_tokens: int = 0
    """Tokens actually run, padding included (rows x padded length per micro-batch; packed: the
    packed row, with its rounding to a multiple of TP)."""
    micro_batches: int = 0
    """Forward micro-batches with real sequences (dummy ones for expert parallelism not counted)."""
    seconds: float = 0.0
    """Wall time of this model's part of `score` (redistribution included)."""


def _request_signature(requests: list[ScoreRequest]) -> int:
    """Cheap fingerprint of a request list (domains and lengths), to compare ranks' lists."""
    return fingerprint(tuple((r.domain, len(r.prompt_ids), len(r.response_ids)) for r in requests))


# ----------------------------------------------------------------------------------------------
# The pool


@dataclass
class _PoolModel:
    """A built model of the pool and how its work is laid out."""

    plan: ModelPlan
    model: Any
    """This rank's pipeline stage of the Megatron GPTModel (eval mode, frozen)."""
    grid: ModelGrid
    shortcut: bool
    """Replicas coincide with the student's model-parallel groups: no token redistribution."""
    stats: ModelStats
    tokenizer: Any = None
    """The model's own tokenizer when it renders prompts itself (`ModelPlan.rerender`), else None."""


class ScoringPool:
    """Forward-only teachers and references; scores the student's rollouts (see the module docstring).

    Construction and `score` / `close` are collective: every rank of the job calls them, in the same
    order. Megatron's parallel state must describe the student (``platform.init_model_parallel``);
    the pool's models use their own process groups and do not touch it.
    """

    def __init__(
        self,
        cfg: ScoringConfig,
        *,
        student_checkpoint: str,
        student_layout: ParallelLayout,
        plan: Optional[ScoringPlan] = None,
    ) -> None:
        """Validate (or take `plan`), then build the models; nothing is built if anything is wrong.

        Args:
            cfg: the teachers, references and batching.
            student_checkpoint: the student's converted checkpoint (its tokenizer and, for the
                ``student_init`` reference, its weights).
            student_layout: the student's layout, as Megatron's parallel state describes it.
            plan: `validate_scoring_config`'s result for exactly these arguments (validated once,
                e.g. by the launcher); None: every rank validates here.

        Raises:
            ScoringConfigError: on every rank, listing every problem (see `validate_scoring_config`).
            ValueError: on every rank, when `plan` was made for another job or `student_layout`
                disagrees with Megatron's parallel state.
        """
        if not dist.is_initialized():
            raise RuntimeError("ScoringPool needs torch.distributed: call platform.init_distributed() first")
        self.cfg = cfg
        world = dist.get_world_size()
        tokenizers: dict[str, Any] = {}
        error: Optional[BaseException] = None
        try:
            if plan is None:
                plan = validate_scoring_config(
                    cfg, student_checkpoint=student_checkpoint, student_layout=student_layout, world_size=world
                )
            else:
                plan.check_matches(
                    cfg, student_checkpoint=student_checkpoint, student_layout=student_layout, world_size=world
                )
            self._student_dp_of_rank = replica_partition(student_layout, world)
            check_megatron_layout(student_layout, self._student_dp_of_rank[dist.get_rank()])
            for model_plan in plan.models:  # only those that render prompts need their tokenizer
                if model_plan.rerender:
                    load_tokenizer(model_plan.tokenizer_dir, tokenizers)
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, or the others would hang
            error = err
        agree(error, "validating the scoring setup")
        self.plan = plan

        self._routing = cfg.routing()
        # Per rank, the lowest rank of its student shard: it speaks for the shard in the all-gather
        # of token ids (its peers hold the same requests).
        partition = self._student_dp_of_rank
        self._student_leaders = [partition.index(partition[r]) for r in range(world)]
        self._student_leader = self._student_leaders[dist.get_rank()]
        self._offload = cfg.offload_to_cpu and not platform.cpu_mode()
        if cfg.offload_to_cpu and platform.cpu_mode():
            logger.info("scoring.offload_to_cpu has no effect on CPU")
        self._closed = False
        self._factory = GroupFactory()
        self._models: dict[str, _PoolModel] = {}
        try:
            grids: dict[ParallelLayout, ModelGrid] = {}
            for model_plan in plan.models:
                if model_plan.layout not in grids:
                    grids[model_plan.layout] = build_grid(model_plan.layout, self._factory)
            # One set of weights per (checkpoint, layout, dtype), however many roles use it (e.g. a
            # teacher's base configured both as a teacher and as another teacher's reference).
            weights: dict[tuple[str, ParallelLayout, str], Any] = {}
            for model_plan in plan.models:
                tokenizer = load_tokenizer(model_plan.tokenizer_dir, tokenizers) if model_plan.rerender else None
                self._models[model_plan.name] = self._load(model_plan, grids[model_plan.layout], weights, tokenizer)
        except BaseException:
            self.close()
            raise

    def _load(
        self, plan: ModelPlan, grid: ModelGrid, weights: dict[tuple[str, ParallelLayout, str], Any], tokenizer: Any
    ) -> _PoolModel:
        start = time.perf_counter()
        key = (str(Path(plan.checkpoint).resolve()), plan.layout, plan.dtype)
        if key not in weights:
            model = load_pool_model(plan, grid.pg_collection)
            if self._offload:
                model.to("cpu")
            weights[key] = model
        shortcut = same_partition(grid.dp_of_rank, self._student_dp_of_rank)
        logger.info(
            "scoring pool: loaded %s at tp=%d pp=%d ep=%d (%d replica(s)%s) in %.1fs",
            plan.label,
            plan.layout.tp,
            plan.layout.pp,
            plan.layout.ep,
            grid.dp_size,
            ", student's layout: no redistribution" if shortcut else "",
            time.perf_counter() - start,
        )
        return _PoolModel(
            plan, weights[key], grid, shortcut, ModelStats(grid.dp_rank, grid.dp_size, not shortcut), tokenizer
        )

    # -- public API -----------------------------------------------------------------------------

    @property
    def teachers(self) -> list[str]:
        """Teacher names, in config order."""
        return list(self.cfg.teachers)

    @property
    def stats(self) -> dict[str, ModelStats]:
        """Per built model (teachers and references by name): what this rank's replica computed."""
        return {name: ModelStats(**vars(m.stats)) for name, m in self._models.items()}

    def parameter_tensors(self) -> list:
        """Every parameter of the pool's models built on this rank (a model shared by several
        teachers appears once per teacher; count storages to measure memory)."""
        return [param for handle in self._models.values() for param in handle.model.parameters()]

    def teacher_for(self, domain: str) -> str:
        """The teacher that scores `domain`.

        Raises:
            UnroutedDomainError: no teacher lists `domain`.
        """
        try:
            return self._routing[domain]
        except KeyError:
            raise UnroutedDomainError(
                f"no teacher scores domain {domain!r}; routed domains: {sorted(self._routing)} (add it "
                "to scoring.teachers.<name>.domains, or set the prompts' domain)"
            ) from None

    def score(self, requests: list[ScoreRequest], topk: int = 0) -> list[SampleScores]:
        """Teacher (and reference) log-probs of every request's response tokens (collective).

        Args:
            requests: this rank's student data-parallel shard of rollouts; ranks of the same student
                TP/PP group pass identical lists (as they hold identical rollouts).
            topk: when > 0, also the teacher's `topk` most likely tokens at every response position
                with their log-probs, and the reference's log-probs of those same tokens (the inputs
                of `megatron_gopd.loss.topk_reverse_kl`). At most the vocabulary size.

        Returns:
            One `SampleScores` per request, in order; tensors fp32 on this rank's device.

        Raises:
            UnroutedDomainError / ValueError: on every rank, when any rank passed a request with an
                unrouted domain, an empty prompt, token ids outside a model's vocabulary, or no
                ``messages`` where a model must render the prompt itself.
        """
        self._check_open()
        teachers: list[str] = []
        inputs: dict[str, list[tuple[int, ScoredSequence]]] = {}
        error: Optional[BaseException] = None
        try:
            vocab = min(h.plan.arch.vocab_size for h in self._models.values())
            if not 0 <= topk <= vocab:
                raise ValueError(f"topk must be in [0, {vocab}] (the vocabulary size), got {topk}")
            teachers = [self.teacher_for(r.domain) for r in requests]
            inputs = self._model_inputs(requests, teachers)
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, or the others would hang
            error = err
        signatures = agree(error, "preparing scoring requests", _request_signature(requests))
        check_same_within_groups(
            signatures,
            self._student_leaders,
            lambda rank, leader: (
                f"rank {rank} passed other requests than rank {leader} of the same student model-parallel group: "
                "ranks holding one data-parallel shard must pass identical request lists to ScoringPool.score"
            ),
        )

        # Per request, [response_len, width] from its teacher and from its reference: column 0 the
        # sampled tokens' log-probs; with topk the teacher adds k top-k log-probs and k ids (as fp32,
        # exact below 2**24), the reference k log-probs of those ids. Teachers run first (the plans
        # are ordered so), so their top-k ids are known when the references run.
        teacher_out: list[Optional[torch.Tensor]] = [None] * len(requests)
        ref_out: list[Optional[torch.Tensor]] = [None] * len(requests)
        for name, handle in self._models.items():
            is_teacher = handle.plan.role == "teacher"
            indexed = inputs.get(name, [])
            if topk and not is_teacher:
                for index, seq in indexed:
                    seq.extra_targets = teacher_out[index][:, 1 + topk :].long().cpu()
            start = time.perf_counter()
            with self._on_device(handle):
                values = self._score_model(
                    handle,
                    [seq for _, seq in indexed],
                    topk if is_teacher else 0,
                    width=1 + (2 * topk if is_teacher else topk),
                )
            handle.stats.seconds += time.perf_counter() - start
            target = teacher_out if is_teacher else ref_out
            for (index, _), value in zip(indexed, values):
                target[index] = value
        results = []
        for index, teacher in enumerate(teachers):
            cfg = self.cfg.teachers[teacher]
            t_out = teacher_out[index]
            r_out = ref_out[index] if cfg.scored_reference else None
            results.append(
                SampleScores(
                    teacher=teacher,
                    lam=cfg.lam,
                    teacher_logprobs=t_out[:, 0].contiguous(),
                    ref_logprobs=None if r_out is None else r_out[:, 0].contiguous(),
                    teacher_topk_ids=t_out[:, 1 + topk :].long() if topk else None,
                    teacher_topk_logprobs=t_out[:, 1 : 1 + topk].contiguous() if topk else None,
                    ref_topk_logprobs=r_out[:, 1:].contiguous() if topk and r_out is not None else None,
                )
            )
        return results

    def close(self) -> None:
        """Free the models and destroy the pool's process groups (collective; idempotent)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self._models = {}
        if getattr(self, "_factory", None) is not None:
            self._factory.close()

    def __enter__(self) -> "ScoringPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- scoring --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ScoringPool is closed")

    def _model_inputs(
        self, requests: list[ScoreRequest], teachers: list[str]
    ) -> dict[str, list[tuple[int, ScoredSequence]]]:
        """Per model: (request index, its input sequence) for the requests it must score."""
        inputs: dict[str, list[tuple[int, ScoredSequence]]] = {name: [] for name in self._models}
        rendered: dict[tuple, list[int]] = {}  # (tokenizer, template kwargs, request) -> prompt ids
        for index, (request, teacher) in enumerate(zip(requests, teachers)):
            reference = self.cfg.teachers[teacher].scored_reference
            for name in (teacher, reference) if reference else (teacher,):
                prompt = self._prompt_ids(self._models[name], request, index, rendered)
                plan = self._models[name].plan
                if not prompt:
                    raise ValueError(f"request {index} (domain {request.domain!r}) has an empty prompt")
                tokens = list(prompt) + list(request.response_ids)
                if min(tokens) < 0 or max(tokens) >= plan.arch.vocab_size:
                    bad = next(t for t in tokens if not 0 <= t < plan.arch.vocab_size)
                    raise ValueError(
                        f"request {index}: token id {bad} is outside the vocabulary of "
                        f"{plan.label} (vocab_size {plan.arch.vocab_size})"
                    )
                inputs[name].append((index, ScoredSequence(tokens, len(prompt))))
        return inputs

    def _prompt_ids(
        self, handle: _PoolModel, request: ScoreRequest, index: int, rendered: dict[tuple, list[int]]
    ) -> list[int]:
        """The prompt in the model's own chat template when it differs from the student's."""
        plan = handle.plan
        if not plan.rerender:
            return request.prompt_ids
        if request.messages is None:
            raise ValueError(
                f"request {index} has no messages, but {plan.label} renders prompts with its "
                "own chat template: pass ScoreRequest.messages (PromptRecord.messages)"
            )
        # Models with the same tokenizer and template variables render a prompt the same way.
        key = (plan.tokenizer_dir, tuple(sorted(plan.template_kwargs.items())), index)
        if key not in rendered:
            rendered[key] = render_prompt_ids(handle.tokenizer, request.messages, plan.template_kwargs)
        return rendered[key]

    @contextlib.contextmanager
    def _on_device(self, handle: _PoolModel) -> Iterator[None]:
        """With offloading, the model's weights sit on the GPU only while it scores."""
        if not self._offload:
            yield
            return
        handle.model.to(platform.device())
        try:
            yield
        finally:
            handle.model.to("cpu")
            torch.cuda.empty_cache()

    def _score_model(
        self, handle: _PoolModel, sequences: list[ScoredSequence], topk: int, width: int
    ) -> list[torch.Tensor]:
        """``[response_len, width]`` of each of this rank's sequences under one model (collective):
        the sampled tokens' log-probs, then those of any extra targets, then `topk` top-k log-probs
        and ids (see `forward.run_forward`)."""
        if handle.shortcut:
            return self._score_in_place(handle, sequences, topk, width)
        return self._score_redistributed(handle, sequences, topk, width)

    def _score_in_place(
        self, handle: _PoolModel, sequences: list[ScoredSequence], topk: int, width: int
    ) -> list[torch.Tensor]:
        """Shortcut: this rank's replica is its student model-parallel group; it scores its shard."""
        grid, device = handle.grid, platform.device()
        micro_batches = pack_by_tokens(
            [len(s.tokens) for s in sequences], self.cfg.micro_batch_tokens, handle.plan.layout.tp, handle.plan.packed
        )
        # Replicas of one expert-parallel group must run as many forwards as each other (their MoE
        # all-to-alls pair up), and a model with no work anywhere is skipped by every rank.
        counts = torch.tensor([len(sequences), len(micro_batches)], dtype=torch.int64, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        if counts[0].item() == 0:
            return []
        logprobs = self._forward(handle, sequences, micro_batches, int(counts[1].item()), topk)
        if handle.plan.layout.pp == 1:
            return logprobs
        # The last stage holds the results; its pipeline peers receive them.
        lengths = [s.response_len for s in sequences]
        flat = (
            torch.cat(logprobs)
            if grid.is_last_stage and logprobs
            else torch.empty((sum(lengths), width), dtype=torch.float32, device=device)
        )
        dist.broadcast(flat, src=grid.last_stage_in_my_pp_group, group=grid.pg_collection.pp)
        return list(flat.split(lengths))

    def _score_redistributed(
        self, handle: _PoolModel, sequences: list[ScoredSequence], topk: int, width: int
    ) -> list[torch.Tensor]:
        """General path: all-gather the batch, score each replica's share, all-gather the results."""
        grid, device, rank = handle.grid, platform.device(), dist.get_rank()
        # 1. One rank per student shard contributes its sequences; every rank learns the whole batch.
        mine = sequences if rank == self._student_leader else []
        per_rank = [decode_sequences(f) for f in all_gather_varlen(encode_sequences(mine, device))]
        batch = [(src, i, seq) for src, seqs in enumerate(per_rank) for i, seq in enumerate(seqs)]
        if not batch:
            return []
        # 2. The same assignment on every rank: whole sequences to replicas, balanced by tokens.
        lengths = [len(seq.tokens) for _, _, seq in batch]
        assignment = balance_by_tokens(lengths, grid.dp_size)
        budget, multiple = self.cfg.micro_batch_tokens, handle.plan.layout.tp
        packed = [
            pack_by_tokens([lengths[i] for i in share], budget, multiple, handle.plan.packed) for share in assignment
        ]
        my_share = assignment[grid.dp_rank]
        logprobs = self._forward(
            handle, [batch[i][2] for i in my_share], packed[grid.dp_rank], max(len(p) for p in packed), topk
        )
        # 3. Each replica's writer contributes its results; every rank keeps its own shard's.
        is_writer = rank == grid.writer_of_replica[grid.dp_rank]
        flat = (
            torch.cat(logprobs).view(-1)
            if is_writer and logprobs
            else torch.empty(0, dtype=torch.float32, device=device)
        )
        gathered = all_gather_varlen(flat)
        by_source: dict[tuple[int, int], torch.Tensor] = {}
        for replica, share in enumerate(assignment):
            response_lens = [batch[i][2].response_len for i in share]
            chunks = gathered[grid.writer_of_replica[replica]].view(-1, width).split(response_lens)
            for i, values in zip(share, chunks):
                by_source[batch[i][:2]] = values
        return [by_source[(self._student_leader, i)] for i in range(len(sequences))]

    def _forward(
        self,
        handle: _PoolModel,
        sequences: list[ScoredSequence],
        micro_batches: list[list[int]],
        min_micro_batches: int,
        topk: int = 0,
    ) -> list[torch.Tensor]:
        """Run this replica's sequences forward-only (`forward.run_forward`) and count the work.

        `min_micro_batches` pads the schedule with one-token dummy micro-batches (expert-parallel
        peers must run the same number of forwards). Returns the sequences' ``[response_len, w]``
        log-probs on the last pipeline stage, an empty list on the other stages.
        """
        multiple, packed = handle.plan.layout.tp, handle.plan.packed
        batches = [collate_forward(sequences, indices, multiple, packed=packed) for indices in micro_batches]
        if handle.plan.layout.ep > 1:
            batches += [
                collate_forward([ScoredSequence([0], 1)], [0], multiple, dummy=True, packed=packed)
                for _ in range(min_micro_batches - len(batches))
            ]
        results = run_forward(
            handle.model, handle.plan, handle.grid.pg_collection, sequences, batches, topk, handle.grid.is_last_stage
        )
        real = [b for b in batches if not b.dummy]
        stats = handle.stats
        stats.sequences += len(sequences)
        stats.tokens += sum(len(s.tokens) for s in sequences)
        stats.padded_tokens += sum(b.tokens.numel() for b in real)
        stats.micro_batches += len(real)
        return results
