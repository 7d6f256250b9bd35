"""Teacher / reference pool: forward-only Megatron models, each with its own parallel layout.

In a G-OPD step every sampled response token is scored by the prompt's teacher (``log pi*(y_t)``)
and, when the teacher's ``lam != 1``, by its reference (``log pi_ref(y_t)``: the student's initial
weights, or the teacher's pre-RL base for reward correction). `ScoringPool` holds those models and
computes these log-probs for the student's rollouts::

    # collective, after platform.init_model_parallel(...) for the student
    pool = ScoringPool(cfg.scoring, student_checkpoint=cfg.model.checkpoint,
                       student_layout=ParallelLayout(tp=1))
    requests = [ScoreRequest(rec.domain, rec.input_ids, response_ids, rec.messages)
                for rec, response_ids in rollouts]     # this rank's student-DP shard
    scores = pool.score(requests)      # collective
    advantages = gopd_advantages(student_logp, scores[i].teacher_logprobs, scores[i].ref_logprobs,
                                 scores[i].lam)
    pool.close()                       # collective: frees the models and the pool's process groups

Layouts. Every rank of the job holds its share of every model. A model at ``(tp, pp, ep)`` splits the
world into ``DP = world / (tp * pp)`` replicas with Megatron's rank order (``tp-cp-ep-dp-pp``: TP
fastest, PP slowest), through its own process groups (a `ProcessGroupCollection`), so a TP=2/PP=2
teacher sits beside a TP=1/DP=4 student in the same processes. Groups with the same members are
created once and shared by every model of the pool.

Redistribution. Requests arrive in the student's data-parallel layout (ranks of one student
model-parallel group pass identical lists). For each model:

* shortcut: when the model's replicas are exactly the student's model-parallel groups (same TP x PP
  ranks, e.g. the ``student_init`` reference, or a teacher at the student's layout), each replica
  scores its own shard; the last pipeline stage broadcasts the result to the other stages.
* general path: one rank per student shard contributes its token ids to an all-gather; every rank
  then knows the whole batch and the same deterministic assignment of sequences to the model's
  replicas (longest first, to the replica with the fewest tokens). Each replica's last-stage TP
  rank 0 contributes its log-probs to a second all-gather, from which every rank takes its own.

Inside a replica, sequences (the model's prompt ids, then the student's response ids) are packed
into micro-batches of at most ``micro_batch_tokens`` tokens (rows x padded length, right padding)
and run forward-only through Megatron's pipeline schedule (`get_forward_backward_func` with the
model's own groups and P2P communicator). Log-probs of the sampled tokens are taken at temperature 1
over the model's real vocabulary (Megatron's padded rows masked) with
`megatron_gopd.logprobs.token_logprobs_from_logits`, in fp32 from the model's logits (a bf16 model's
logits carry bf16 rounding: see shared/pitfalls.md). MoE models route dropless (set by the model
builder), so a token's log-prob does not depend on its batch; replicas of one expert-parallel group
run the same number of micro-batches (one-token dummies fill the gap) because their all-to-alls
pair up. Models with the same checkpoint, layout and dtype share one set of weights.

Chat templates (shared/pitfalls.md). A model whose chat template differs from the student's (or that
sets its own ``chat_template_kwargs``) renders the prompt's ``messages`` with its own tokenizer; the
student's response ids are appended unchanged (never re-tokenised), and the response's log-probs are
read at that model's prompt length.

Memory. ``offload_to_cpu`` (GPU only) keeps every forward-only model's weights in host memory and
moves one model at a time to the GPU for its forward passes, so the pool's GPU footprint is one
model plus activations; the price is one host-to-device copy of each model's weights per
`score` call (about weight bytes / PCIe bandwidth). On CPU it does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_gopd import platform
from megatron_gopd.bridge.safetensors_io import CheckpointError
from megatron_gopd.checkpointing import HF_SUBDIR, read_checkpoint_meta
from megatron_gopd.data import check_template_kwargs, render_prompt_ids
from megatron_gopd.logprobs import token_logprobs_from_logits, topk_logprobs_from_logits
from megatron_gopd.models import ModelArchitecture, ParallelLayout
from megatron_gopd.models.builder import torch_dtype

logger = logging.getLogger(__name__)

__all__ = [
    "STUDENT_INIT", "ModelPlan", "ModelStats", "PoolModelConfig", "SampleScores", "ScoreRequest",
    "ScoringConfig", "ScoringConfigError", "ScoringPool", "TeacherConfig", "UnroutedDomainError",
    "validate_scoring_config",
]

STUDENT_INIT = "student_init"
"""Reference name for the student's initial checkpoint, loaded once at the student's layout."""

# Files whose presence means <ckpt>/hf/ carries a tokenizer that AutoTokenizer can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ScoringConfigError(ValueError):
    """A scoring setup that cannot work; the message lists every problem found, one per line."""


class UnroutedDomainError(ValueError):
    """A prompt domain that no teacher scores."""


# ----------------------------------------------------------------------------------------------
# Configs


@dataclass
class PoolModelConfig:
    """A forward-only model of the pool (a teacher or a reference)."""

    checkpoint: str = ""
    """A converted Megatron checkpoint (``gopd-convert hf-to-mcore`` output, with ``hf/`` inside);
    loadable at any layout, whatever layout it was saved from."""
    tp: int = 1
    """Tensor-parallel size of this model (independent of the student's)."""
    pp: int = 1
    """Pipeline-parallel size of this model; ``tp * pp`` must divide the world."""
    ep: int = 1
    """Expert-parallel size (MoE models); carved out of this model's data parallelism."""
    dtype: Optional[str] = None
    """``float32`` / ``bfloat16`` / ``float16``; None: the dtype the checkpoint was converted in."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Variables for this model's chat template (e.g. ``enable_thinking``). Setting any makes the
    model render prompts itself even when its template equals the student's."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype is not None:
            torch_dtype(self.dtype)  # raises naming the supported dtypes

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(tp=self.tp, pp=self.pp, ep=self.ep)


@dataclass
class TeacherConfig:
    """One teacher: its model, the prompt domains it scores, its reward scale and its reference."""

    model: PoolModelConfig = field(default_factory=PoolModelConfig)
    """The teacher model."""
    domains: list[str] = field(default_factory=list)
    """Prompt domains (``PromptRecord.domain``) routed to this teacher; each domain to one teacher."""
    lam: float = 1.0
    """G-OPD reward scale: 1 = plain OPD, (0, 1) interpolates, > 1 extrapolates (ExOPD, e.g. 1.25)."""
    reference: Optional[str] = STUDENT_INIT
    """``"student_init"`` (the student's initial weights), a key of `ScoringConfig.references` (e.g.
    the teacher's pre-RL base: reward correction), or None (allowed only with ``lam == 1``). With
    ``lam == 1`` the reference drops out of the advantage and is neither loaded nor run."""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = PoolModelConfig(**self.model)
        problems = _teacher_value_problems(self)
        if problems:
            raise ValueError(problems[0])

    @property
    def scored_reference(self) -> Optional[str]:
        """The reference this teacher's samples are scored with: None when lam == 1."""
        return None if self.lam == 1.0 else self.reference


def _teacher_value_problems(teacher: TeacherConfig) -> list[str]:
    lam = teacher.lam
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
        return [f"lam must be a finite number > 0, got {lam!r}"]
    if teacher.reference is None and lam != 1.0:
        return [f"reference: null is allowed only with lam == 1 (plain OPD, where the reference "
                f"drops out); lam={lam} needs a reference: {STUDENT_INIT!r} or a key of "
                "scoring.references"]
    return []


@dataclass
class ScoringConfig:
    """The teachers and references of a G-OPD run, and how their forward passes are batched."""

    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    """Teachers by name; every prompt domain of the data must belong to exactly one of them."""
    references: dict[str, PoolModelConfig] = field(default_factory=dict)
    """Reference models by name (e.g. a teacher's pre-RL base), named by `TeacherConfig.reference`;
    one shared by several teachers is loaded once. ``student_init`` is built in and reserved."""
    micro_batch_tokens: int = 4096
    """Forward micro-batches are packed up to this many tokens (rows x padded length); a longer
    sequence gets a micro-batch of its own. Bounds the logits memory: tokens x vocab / tp."""
    offload_to_cpu: bool = False
    """GPU only: keep forward-only weights in host memory and move one model at a time to the GPU
    while it scores (see the module docstring). Ignored on CPU."""

    def __post_init__(self) -> None:
        # A generic YAML loader or a caller may hand nested configs over as plain dicts.
        self.teachers = {name: TeacherConfig(**t) if isinstance(t, dict) else t
                         for name, t in self.teachers.items()}
        self.references = {name: PoolModelConfig(**r) if isinstance(r, dict) else r
                           for name, r in self.references.items()}
        problems = self.value_problems()
        if problems:
            raise ScoringConfigError(_format_problems("scoring config", problems))

    def value_problems(self) -> list[str]:
        """Checks that need no files: values, names, routing, reference names."""
        problems = []
        if self.micro_batch_tokens < 1:
            problems.append(f"micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        for kind, names in (("teachers", self.teachers), ("references", self.references)):
            if STUDENT_INIT in names:
                problems.append(f"{kind} may not be named {STUDENT_INIT!r}: the name is reserved for the "
                                "student's initial checkpoint")
        for name in sorted(set(self.teachers) & set(self.references)):
            problems.append(f"{name!r} names both a teacher and a reference; give them distinct names")
        owner: dict[str, str] = {}
        for name, teacher in self.teachers.items():
            problems += [f"teacher {name!r}: {p}" for p in _teacher_value_problems(teacher)]
            if not teacher.domains:
                problems.append(f"teacher {name!r} has no domains: list the prompt domains it scores")
            for domain in teacher.domains:
                if domain in owner:
                    problems.append(f"domain {domain!r} is claimed by teachers {owner[domain]!r} and "
                                    f"{name!r}; route each domain to one teacher")
                owner.setdefault(domain, name)
            ref = teacher.reference
            if ref is not None and ref != STUDENT_INIT and ref not in self.references:
                known = sorted({STUDENT_INIT, *self.references})
                problems.append(f"teacher {name!r}: reference {ref!r} is not defined; known: {known} "
                                "(add it under scoring.references)")
        return problems

    def routing(self) -> dict[str, str]:
        """Domain -> teacher name."""
        return {domain: name for name, teacher in self.teachers.items() for domain in teacher.domains}


def _format_problems(what: str, problems: Sequence[str]) -> str:
    return f"{what} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems)


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
    """Tokens actually run, padding included (rows x padded length per micro-batch)."""
    micro_batches: int = 0
    """Forward micro-batches with real sequences (dummy ones for expert parallelism not counted)."""
    seconds: float = 0.0
    """Wall time of this model's part of `score` (redistribution included)."""


# ----------------------------------------------------------------------------------------------
# Validation (no process groups, no models): the same on every rank


@dataclass
class ModelPlan:
    """A model the pool will build, resolved from the config and checked against the files."""

    name: str
    role: str
    """``"teacher"`` or ``"reference"``."""
    checkpoint: str
    layout: ParallelLayout
    dtype: str
    """Resolved: the config's, else the dtype the checkpoint was converted in."""
    arch: ModelArchitecture
    tokenizer: Any
    """The tokenizer from ``<checkpoint>/hf/``, or None when it has none."""
    template_kwargs: dict[str, Any]
    rerender: bool
    """Whether prompts are rendered with this model's own chat template (else the student's ids)."""

    @property
    def label(self) -> str:
        return f"{self.role} {self.name!r} ({self.checkpoint})"


class _CheckedCheckpoint:
    """A checkpoint's architecture and tokenizer, or the problems that prevent using it."""

    def __init__(self, role: str, label: str, checkpoint: str, tokenizers: dict[str, Any]) -> None:
        self.role = role
        self.label = label
        self.arch: Optional[ModelArchitecture] = None
        self.tokenizer: Any = None
        self.meta: dict[str, Any] = {}
        self.problems: list[str] = []
        if not checkpoint:
            self.problems.append(f"{label}: no checkpoint given")
            return
        if not Path(checkpoint).is_dir():
            self.problems.append(f"{label}: checkpoint {checkpoint} does not exist")
            return
        try:
            self.meta = read_checkpoint_meta(checkpoint)
            self.arch = ModelArchitecture.from_pretrained(Path(checkpoint) / HF_SUBDIR)
        except (CheckpointError, FileNotFoundError, ValueError) as err:
            self.problems.append(f"{label}: {err}")
            return
        self.tokenizer = _load_tokenizer(Path(checkpoint) / HF_SUBDIR, tokenizers)

    def check_layout(self, layout: ParallelLayout, world_size: int) -> None:
        tp, pp = layout.tp, layout.pp
        if world_size % (tp * pp):
            self.problems.append(f"{self.label}: tp x pp = {tp} x {pp} = {tp * pp} does not divide the "
                                 f"world size {world_size}")
            return
        if (world_size // pp) % (layout.ep * layout.expert_tp):
            self.problems.append(f"{self.label}: ep x expert tp = {layout.ep} x {layout.expert_tp} does "
                                 f"not divide world / pp = {world_size // pp}")
        if self.arch is not None:
            try:
                self.arch.validate_parallel(tp, pp, layout.ep, layout.etp)
            except ValueError as err:
                self.problems.append(f"{self.label}: {err}")


def _load_tokenizer(hf_dir: Path, cache: dict[str, Any]) -> Any:
    """AutoTokenizer from `hf_dir` (cached by path), or None when it holds no tokenizer files."""
    key = str(hf_dir.resolve())
    if key not in cache:
        cache[key] = None
        if any((hf_dir / name).is_file() for name in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            cache[key] = AutoTokenizer.from_pretrained(str(hf_dir))
    return cache[key]


def _vocabulary_problem(model: _CheckedCheckpoint, student: _CheckedCheckpoint) -> Optional[str]:
    """Why `model` cannot score the student's tokens, or None when the vocabularies agree.

    Token ids must mean the same string in both models; compared on the tokenizers' ``get_vocab()``
    (added tokens included), or on ``vocab_size`` when either checkpoint has no tokenizer.
    """
    if model.arch is None or student.arch is None:
        return None
    if model.tokenizer is None or student.tokenizer is None:
        logger.warning("%s or the student has no tokenizer files in %s/: comparing vocab_size only",
                       model.label, HF_SUBDIR)
        if model.arch.vocab_size != student.arch.vocab_size:
            return (f"{model.label} has vocab_size {model.arch.vocab_size} but the student "
                    f"({student.label}) has {student.arch.vocab_size}: they must share the tokenizer")
        return None
    model_vocab, student_vocab = model.tokenizer.get_vocab(), student.tokenizer.get_vocab()
    if model_vocab == student_vocab:
        return None
    differing = sorted(set(model_vocab.items()) ^ set(student_vocab.items()), key=lambda kv: (kv[1], kv[0]))
    examples = []
    for token, _ in differing[:3]:
        examples.append(f"{token!r} is id {student_vocab.get(token)} in the student, "
                        f"{model_vocab.get(token)} in the {model.role}")
    return (f"{model.label} and the student ({student.label}) have different tokenizers "
            f"({len(model_vocab)} vs {len(student_vocab)} tokens; e.g. {'; '.join(examples)}): "
            "teacher, reference and student must share the vocabulary")


def validate_scoring_config(cfg: ScoringConfig, *, student_checkpoint: str, student_layout: ParallelLayout,
                            world_size: int) -> list[ModelPlan]:
    """Check everything a `ScoringPool` needs, without building anything; return what it will build.

    Checks: the config's values (`ScoringConfig.value_problems`); at least one teacher; every
    teacher / reference checkpoint (and the student's) exists and is a converted checkpoint with a
    supported ``hf/config.json``; each model's vocabulary equals the student's; each model's
    ``tp * pp`` divides `world_size` and its shapes split at that layout; a model whose chat
    template differs from the student's has one. Runs on one process (no collectives).

    Returns:
        The models to build, teachers first (config order), then the references at least one
        teacher with ``lam != 1`` uses (``student_init`` last); unused references are validated
        and skipped.

    Raises:
        ScoringConfigError: listing every problem found.
    """
    problems = list(cfg.value_problems())
    if not cfg.teachers:
        problems.append("no teachers: set scoring.teachers.<name>.model.checkpoint and its domains")
    tokenizers: dict[str, Any] = {}  # by path: the student's is often every model's
    student = _CheckedCheckpoint("student", f"student ({student_checkpoint})", student_checkpoint, tokenizers)
    student.check_layout(student_layout, world_size)
    problems += student.problems

    used_refs = {t.scored_reference for t in cfg.teachers.values()} - {None}
    plans = []
    for name, role, model_cfg in _pool_candidates(cfg, student_checkpoint, used_refs):
        layout = student_layout if name == STUDENT_INIT else model_cfg.layout
        plan, model_problems = _check_model(name, role, model_cfg, layout, student, world_size, tokenizers)
        problems += model_problems
        if role == "reference" and name not in used_refs:
            logger.warning("reference %r is defined but no teacher with lam != 1 uses it: not loaded", name)
        elif plan is not None:
            plans.append(plan)
    if problems:
        raise ScoringConfigError(_format_problems("scoring setup", problems))
    return plans


def _pool_candidates(cfg: ScoringConfig, student_checkpoint: str,
                     used_refs: set[str]) -> list[tuple[str, str, PoolModelConfig]]:
    """(name, role, config) of every configured model, plus ``student_init`` when a teacher uses it."""
    for name, teacher in cfg.teachers.items():
        if teacher.lam == 1.0 and teacher.reference is not None:
            logger.info("teacher %r has lam == 1: its reference %r drops out of the advantage and is "
                        "not run", name, teacher.reference)
    candidates = [(name, "teacher", t.model) for name, t in cfg.teachers.items()]
    candidates += [(name, "reference", r) for name, r in cfg.references.items()]
    if STUDENT_INIT in used_refs:
        candidates.append((STUDENT_INIT, "reference", PoolModelConfig(checkpoint=student_checkpoint)))
    return candidates


def _check_model(name: str, role: str, model_cfg: PoolModelConfig, layout: ParallelLayout,
                 student: _CheckedCheckpoint, world_size: int,
                 tokenizers: dict[str, Any]) -> tuple[Optional[ModelPlan], list[str]]:
    """One model's plan (None if unusable) and its problems: files, layout, vocabulary, template."""
    checked = _CheckedCheckpoint(role, f"{role} {name!r} ({model_cfg.checkpoint})", model_cfg.checkpoint,
                                 tokenizers)
    checked.check_layout(layout, world_size)
    vocab_problem = _vocabulary_problem(checked, student)
    if vocab_problem:
        checked.problems.append(vocab_problem)
    template = getattr(checked.tokenizer, "chat_template", None)
    student_template = getattr(student.tokenizer, "chat_template", None)
    rerender = bool(model_cfg.chat_template_kwargs) or template != student_template
    if not checked.problems and rerender:
        checked.problems += _template_problems(checked, model_cfg.chat_template_kwargs)
    if checked.problems:
        return None, checked.problems
    assert checked.arch is not None
    plan = ModelPlan(name=name, role=role, checkpoint=model_cfg.checkpoint, layout=layout,
                     dtype=model_cfg.dtype or checked.meta.get("dtype", "float32"), arch=checked.arch,
                     tokenizer=checked.tokenizer, template_kwargs=dict(model_cfg.chat_template_kwargs),
                     rerender=rerender)
    return plan, []


def _template_problems(model: _CheckedCheckpoint, template_kwargs: dict[str, Any]) -> list[str]:
    """Problems rendering prompts with `model`'s own chat template (it differs from the student's)."""
    if model.tokenizer is None:
        return [f"{model.label} has no tokenizer files but must render prompts itself (its chat template "
                "differs from the student's, or it sets chat_template_kwargs): copy the tokenizer into "
                f"its {HF_SUBDIR}/ directory"]
    try:
        check_template_kwargs(model.tokenizer, template_kwargs)
    except ValueError as err:
        return [f"{model.label}: {err}"]
    return []


# ----------------------------------------------------------------------------------------------
# Process groups of one layout


def _rank_groups(grid: dict[str, int], dims: Sequence[str]) -> list[list[int]]:
    """Rank lists of the groups spanning `dims` of a grid, as Megatron's RankGenerator makes them.

    `grid` maps dimension names to sizes, fastest-varying first (Megatron's order string
    ``tp-cp-ep-dp-pp`` reads the same way). Equivalent to `HyperCommGrid.get_rank_enum`, which
    needs einops (not a dependency of this project).
    """
    names = list(grid)[::-1]  # slowest first: the axes of the rank array
    ranks = np.arange(int(np.prod(list(grid.values())))).reshape([grid[n] for n in names])
    keep = [i for i, n in enumerate(names) if n not in dims]
    span = [i for i, n in enumerate(names) if n in dims]
    size = int(np.prod([grid[n] for n in dims]))
    return ranks.transpose(keep + span).reshape(-1, size).tolist()


class _GroupFactory:
    """Creates process groups once per distinct member set, and destroys them all on `close`.

    Every rank must call `group` with the same rank lists in the same order (``dist.new_group`` is
    collective over the world); a member set seen before returns the same group, so the pool holds
    one gloo / NCCL communicator per distinct set of ranks, however many models and roles use it.
    """

    def __init__(self) -> None:
        self._groups: dict[tuple[int, ...], Any] = {}
        self._rank = dist.get_rank()

    def group(self, rank_lists: list[list[int]], optional: bool = False) -> Optional[dist.ProcessGroup]:
        """The group of `rank_lists` this rank belongs to (creating all of them if new).

        With `optional`, a rank in none of them gets None (Megatron's convention for the embedding
        groups, which only the first and last pipeline stages join).
        """
        mine = None
        for ranks in rank_lists:
            key = tuple(sorted(ranks))
            if key not in self._groups:
                self._groups[key] = dist.new_group(ranks=list(key))
            if self._rank in key:
                mine = self._groups[key]
        if mine is None and not optional:
            raise RuntimeError(f"rank {self._rank} is in none of the groups {rank_lists}")
        return mine

    def close(self) -> None:
        # Each live gloo group keeps threads (see platform._recording_new_groups): destroy them.
        for group in self._groups.values():
            if isinstance(group, dist.ProcessGroup) and dist.is_initialized():
                dist.destroy_process_group(group)
        self._groups.clear()


@dataclass
class _Grid:
    """One layout's process groups and where every rank sits in it."""

    layout: ParallelLayout
    pg_collection: Any
    """megatron.core.process_groups_config.ProcessGroupCollection of this layout."""
    dp_of_rank: list[int]
    """Data-parallel replica of every global rank."""
    writer_of_replica: list[int]
    """Per replica, the rank that contributes its results: last pipeline stage, TP rank 0."""
    last_stage_in_my_pp_group: int
    """Global rank of the last pipeline stage of this rank's pipeline."""

    @property
    def dp_size(self) -> int:
        return len(self.writer_of_replica)

    @property
    def dp_rank(self) -> int:
        return self.dp_of_rank[dist.get_rank()]

    @property
    def is_last_stage(self) -> bool:
        return self.pg_collection.pp.rank() == self.layout.pp - 1


def _dense_grid(layout: ParallelLayout, world: int) -> dict[str, int]:
    return {"tp": layout.tp, "cp": 1, "dp": world // (layout.tp * layout.pp), "pp": layout.pp}


def _replica_partition(layout: ParallelLayout, world: int) -> list[int]:
    """Data-parallel replica of every global rank under `layout` (Megatron's rank order)."""
    dp_of_rank = [0] * world
    for replica, ranks in enumerate(_rank_groups(_dense_grid(layout, world), ["tp", "pp"])):
        for rank in ranks:
            dp_of_rank[rank] = replica
    return dp_of_rank


def _build_grid(layout: ParallelLayout, factory: _GroupFactory) -> _Grid:
    """Every group GPTModel, its MoE layers and the pipeline schedules read from a collection."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    world = dist.get_world_size()
    dense = _dense_grid(layout, world)
    etp, ep = layout.expert_tp, layout.ep
    expert = {"tp": etp, "ep": ep, "dp": world // (layout.pp * ep * etp), "pp": layout.pp}
    pgs = ProcessGroupCollection()
    for name, dims in (("tp", ["tp"]), ("cp", ["cp"]), ("dp", ["dp"]), ("pp", ["pp"]),
                       ("tp_cp", ["tp", "cp"]), ("dp_cp", ["cp", "dp"]), ("mp", ["tp", "pp"]),
                       ("tp_dp_cp", ["tp", "cp", "dp"])):
        setattr(pgs, name, factory.group(_rank_groups(dense, dims)))
    for name, dims in (("ep", ["ep"]), ("expt_tp", ["tp"]), ("tp_ep", ["tp", "ep"]), ("expt_dp", ["dp"]),
                       ("tp_ep_pp", ["tp", "ep", "pp"])):
        setattr(pgs, name, factory.group(_rank_groups(expert, dims)))
    pipelines = _rank_groups(dense, ["pp"])
    # Word embeddings live on the first and last stage (tied weights are synchronised there), the
    # position embedding on the first; as parallel_state.default_embedding_ranks.
    pgs.embd = factory.group([[p[0], p[-1]] if len(p) > 1 else [p[0]] for p in pipelines], optional=True)
    pgs.pos_embd = factory.group([[p[0]] for p in pipelines], optional=True)

    dp_of_rank = _replica_partition(layout, world)
    writers = [0] * dense["dp"]
    for pipeline in pipelines:
        last = pipeline[-1]
        if last % layout.tp == 0:  # TP rank 0 (TP is the fastest dimension)
            writers[dp_of_rank[last]] = last
    my_pipeline = next(p for p in pipelines if dist.get_rank() in p)
    return _Grid(layout, pgs, dp_of_rank, writers, my_pipeline[-1])


# ----------------------------------------------------------------------------------------------
# Sequences, packing, collectives


@dataclass
class _Sequence:
    """One model's input for one request: its prompt ids followed by the student's response ids."""

    tokens: list[int]
    prompt_len: int
    extra_targets: Optional[torch.Tensor] = None
    """``[response_len, k]`` int64 token ids whose log-probs are wanted at each response position
    besides the sampled token's (a reference scoring its teacher's top-k), or None."""

    @property
    def response_len(self) -> int:
        return len(self.tokens) - self.prompt_len


def _pack_micro_batches(lengths: Sequence[int], budget: int, multiple: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most `budget` padded tokens.

    Longest first, so each micro-batch pads to its first sequence's length (rounded up to
    `multiple`: sequence parallelism splits the sequence over TP). A sequence longer than the
    budget gets a micro-batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    padded_len = 0
    for index in order:
        if batches and (len(batches[-1]) + 1) * padded_len <= budget:
            batches[-1].append(index)
        else:
            batches.append([index])
            padded_len = _round_up(lengths[index], multiple)
    return batches


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass
class _MicroBatch:
    """One forward micro-batch of a replica (the same on every rank of the replica)."""

    tokens: torch.Tensor
    """[b, s] int64 token ids, right-padded with 0."""
    positions: torch.Tensor
    """[b, s] int64 position ids."""
    targets: torch.Tensor
    """[s, b] int64: the token each position predicts (the next one; 0 past the end); [s, b, 1 + k]
    when the sequences carry ``extra_targets`` (column 0 the next token, then the extra ids at
    response positions, 0 elsewhere)."""
    indices: list[int]
    """Which of the replica's sequences each row holds."""
    dummy: bool = False


def _collate(sequences: Sequence[_Sequence], indices: list[int], multiple: int,
             dummy: bool = False) -> _MicroBatch:
    """Rows `indices` of `sequences` as one right-padded micro-batch (length a multiple of `multiple`)."""
    device = platform.device()
    length = _round_up(max(len(sequences[i].tokens) for i in indices), multiple)
    # Right padding: under the causal mask no real position attends to a padded one, so padding
    # changes nothing a response log-prob depends on.
    tokens = torch.zeros((len(indices), length), dtype=torch.int64)
    for row, index in enumerate(indices):
        seq_tokens = sequences[index].tokens
        tokens[row, : len(seq_tokens)] = torch.tensor(seq_tokens, dtype=torch.int64)
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    extra = [sequences[i].extra_targets for i in indices]
    if not dummy and extra[0] is not None:
        k = extra[0].shape[1]
        targets = torch.cat([targets.unsqueeze(-1), targets.new_zeros(targets.shape + (k,))], dim=-1)
        for row, index in enumerate(indices):
            seq = sequences[index]
            start = seq.prompt_len - 1  # position t predicts token t + 1
            targets[row, start:start + seq.response_len, 1:] = seq.extra_targets
    positions = torch.arange(length, dtype=torch.int64).unsqueeze(0).expand(len(indices), -1)
    return _MicroBatch(tokens.to(device), positions.to(device), targets.transpose(0, 1).contiguous().to(device),
                       [] if dummy else list(indices), dummy)


def _balance(lengths: Sequence[int], num_replicas: int) -> list[list[int]]:
    """Assign sequences to replicas: longest first, each to the replica with the fewest tokens.

    Deterministic (ties go to the lower index), so every rank computes the same assignment.
    """
    load = [0] * num_replicas
    assignment: list[list[int]] = [[] for _ in range(num_replicas)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        replica = min(range(num_replicas), key=lambda r: (load[r], r))
        assignment[replica].append(index)
        load[replica] += lengths[index]
    return assignment


def _all_gather_varlen(flat: torch.Tensor) -> list[torch.Tensor]:
    """All-gather 1-D tensors of different lengths over the world; one tensor per rank."""
    world = dist.get_world_size()
    size = torch.tensor([flat.numel()], dtype=torch.int64, device=flat.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = flat.new_zeros(max(counts))
    padded[: flat.numel()] = flat
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [g[:n] for g, n in zip(gathered, counts)]


def _encode_sequences(sequences: Sequence[_Sequence], device: torch.device) -> torch.Tensor:
    """[n, then (length, prompt_len, k) per sequence, then per sequence its tokens and its
    ``response_len * k`` extra targets] as one int64 tensor (k = 0 without extra targets)."""
    header = [len(sequences)]
    body: list[torch.Tensor] = []
    for s in sequences:
        k = 0 if s.extra_targets is None else s.extra_targets.shape[1]
        header += [len(s.tokens), s.prompt_len, k]
        body.append(torch.tensor(s.tokens, dtype=torch.int64))
        if k:
            body.append(s.extra_targets.reshape(-1).to(torch.int64).cpu())
    return torch.cat([torch.tensor(header, dtype=torch.int64), *body]).to(device)


def _decode_sequences(flat: torch.Tensor) -> list[_Sequence]:
    values = flat.cpu()
    if not values.numel():
        return []
    count = int(values[0])
    header = values[1:1 + 3 * count].view(count, 3).tolist()
    pos = 1 + 3 * count
    sequences = []
    for length, prompt_len, k in header:
        tokens = values[pos:pos + length].tolist()
        pos += length
        extra = None
        if k:
            response_len = length - prompt_len
            extra = values[pos:pos + response_len * k].view(response_len, k).clone()
            pos += response_len * k
        sequences.append(_Sequence(tokens, prompt_len, extra))
    return sequences


def _agree(error: Optional[BaseException], what: str, payload: Any = None) -> list[Any]:
    """Raise on every rank if `what` failed on any rank (so that no rank waits in a collective).

    Returns every rank's `payload` (one all-gather carries both).
    """
    gathered: list[Any] = [None] * dist.get_world_size()
    message = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(gathered, (message, payload))
    failed = [(rank, m) for rank, (m, _) in enumerate(gathered) if m is not None]
    if error is not None:
        raise error
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"{what} failed on rank {rank}: {message}")
    return [p for _, p in gathered]


def _request_signature(requests: Sequence[ScoreRequest]) -> tuple:
    """Cheap fingerprint of a request list (domains and lengths), to compare ranks' lists."""
    return tuple((r.domain, len(r.prompt_ids), len(r.response_ids)) for r in requests)


# ----------------------------------------------------------------------------------------------
# Loading and layout checks

def _load_with_groups(plan: ModelPlan, pg_collection: Any):
    """Build `plan`'s model on its own process groups and load its checkpoint (collective).

    Not `bridge.convert.load_converted_model`: its ``model.sharded_state_dict()`` takes the replica
    ids from Megatron's global data-parallel group (the student's), so a model whose DP size differs
    (e.g. TP=2/PP=2 beside a DP=4 student) fails dist_checkpointing's access validation. Passing the
    model's own ``dp_cp`` group in the metadata gives every shard exactly one main replica.
    """
    from megatron.core import dist_checkpointing

    from megatron_gopd.models import build_gpt_model

    model = build_gpt_model(plan.arch, plan.layout, dtype=plan.dtype, pg_collection=pg_collection,
                            perform_initialization=False)
    sharded = model.sharded_state_dict(metadata={"dp_cp_group": pg_collection.dp_cp})
    model.load_state_dict(dist_checkpointing.load(sharded, plan.checkpoint))
    return model


def _same_partition(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether two rank -> replica maps group the ranks identically (replica numbering aside)."""
    groups = lambda m: {frozenset(r for r in range(len(m)) if m[r] == v) for v in set(m)}  # noqa: E731
    return groups(a) == groups(b)


def _check_student_parallel_state(layout: ParallelLayout, expected_dp_rank: int) -> None:
    """Refuse a `student_layout` that disagrees with Megatron's parallel state (when initialised)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return
    actual = (parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_pipeline_model_parallel_world_size(),
              parallel_state.get_data_parallel_rank())
    if actual != (layout.tp, layout.pp, expected_dp_rank):
        raise ValueError(f"student_layout tp={layout.tp} pp={layout.pp} (data-parallel rank "
                         f"{expected_dp_rank}) does not match Megatron's parallel state tp={actual[0]} "
                         f"pp={actual[1]} (data-parallel rank {actual[2]}): pass the student's layout")


# ----------------------------------------------------------------------------------------------
# The pool


@dataclass
class _PoolModel:
    """A built model of the pool and how its work is laid out."""

    plan: ModelPlan
    model: Any
    """This rank's pipeline stage of the Megatron GPTModel (eval mode, frozen)."""
    grid: _Grid
    shortcut: bool
    """Replicas coincide with the student's model-parallel groups: no token redistribution."""
    stats: ModelStats


class ScoringPool:
    """Forward-only teachers and references; scores the student's rollouts (see the module docstring).

    Construction and `score` / `close` are collective: every rank of the job calls them, in the same
    order. Megatron's parallel state must describe the student (``platform.init_model_parallel``);
    the pool's models use their own process groups and do not touch it.
    """

    def __init__(self, cfg: ScoringConfig, *, student_checkpoint: str,
                 student_layout: ParallelLayout) -> None:
        """Validate everything (no model is built if anything is wrong), then build the models.

        Raises:
            ScoringConfigError: on every rank, listing every problem (see `validate_scoring_config`).
        """
        if not dist.is_initialized():
            raise RuntimeError("ScoringPool needs torch.distributed: call platform.init_distributed() first")
        self.cfg = cfg
        world = dist.get_world_size()
        plans: list[ModelPlan] = []
        error: Optional[BaseException] = None
        try:
            plans = validate_scoring_config(cfg, student_checkpoint=student_checkpoint,
                                            student_layout=student_layout, world_size=world)
            self._student_dp_of_rank = _replica_partition(student_layout, world)
            _check_student_parallel_state(student_layout, self._student_dp_of_rank[dist.get_rank()])
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, or the others would hang
            error = err
        _agree(error, "validating the scoring setup")

        self._routing = cfg.routing()
        # Per rank, the lowest rank of its student shard: it speaks for the shard in the all-gather
        # of token ids (its peers hold the same requests).
        partition = self._student_dp_of_rank
        self._student_leaders = [partition.index(partition[r]) for r in range(world)]
        self._student_leader = self._student_leaders[dist.get_rank()]
        self._offload = cfg.offload_to_cpu and not platform.cpu_mode()
        if cfg.offload_to_cpu and platform.cpu_mode():
            logger.info("scoring.offload_to_cpu has no effect on CPU")
        self._factory = _GroupFactory()
        self._models: dict[str, _PoolModel] = {}
        try:
            grids: dict[ParallelLayout, _Grid] = {}
            for plan in plans:
                if plan.layout not in grids:
                    grids[plan.layout] = _build_grid(plan.layout, self._factory)
            # One set of weights per (checkpoint, layout, dtype), however many roles use it (e.g. a
            # teacher's base configured both as a teacher and as another teacher's reference).
            weights: dict[tuple[str, ParallelLayout, str], Any] = {}
            for plan in plans:
                self._models[plan.name] = self._load(plan, grids[plan.layout], weights)
        except BaseException:
            self.close()
            raise
        self._closed = False

    # -- construction ---------------------------------------------------------------------------

    def _load(self, plan: ModelPlan, grid: _Grid,
              weights: dict[tuple[str, ParallelLayout, str], Any]) -> _PoolModel:
        start = time.perf_counter()
        key = (str(Path(plan.checkpoint).resolve()), plan.layout, plan.dtype)
        if key not in weights:
            model = _load_with_groups(plan, grid.pg_collection)
            model.eval()
            model.requires_grad_(False)
            # Micro-batches differ in length: pipeline stages exchange shapes before activations.
            model.config.variable_seq_lengths = True
            if self._offload:
                model.to("cpu")
            weights[key] = model
        model = weights[key]
        shortcut = _same_partition(grid.dp_of_rank, self._student_dp_of_rank)
        logger.info("scoring pool: loaded %s at tp=%d pp=%d ep=%d (%d replica(s)%s) in %.1fs", plan.label,
                    plan.layout.tp, plan.layout.pp, plan.layout.ep, grid.dp_size,
                    ", student's layout: no redistribution" if shortcut else "",
                    time.perf_counter() - start)
        return _PoolModel(plan, model, grid, shortcut, ModelStats(grid.dp_rank, grid.dp_size, not shortcut))

    # -- public API -----------------------------------------------------------------------------

    @property
    def teachers(self) -> list[str]:
        """Teacher names, in config order."""
        return list(self.cfg.teachers)

    @property
    def stats(self) -> dict[str, ModelStats]:
        """Per built model (teachers and references by name): what this rank's replica computed."""
        return {name: ModelStats(**vars(m.stats)) for name, m in self._models.items()}

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
                "to scoring.teachers.<name>.domains, or set the prompts' domain)") from None

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
        inputs: dict[str, list[tuple[int, _Sequence]]] = {}
        error: Optional[BaseException] = None
        try:
            vocab = min(h.plan.arch.vocab_size for h in self._models.values())
            if not 0 <= topk <= vocab:
                raise ValueError(f"topk must be in [0, {vocab}] (the vocabulary size), got {topk}")
            teachers = [self.teacher_for(r.domain) for r in requests]
            inputs = self._model_inputs(requests, teachers)
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, or the others would hang
            error = err
        signatures = _agree(error, "preparing scoring requests", _request_signature(requests))
        self._check_identical_within_groups(signatures)

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
                    seq.extra_targets = teacher_out[index][:, 1 + topk:].long().cpu()
            start = time.perf_counter()
            with self._on_device(handle):
                values = self._score_model(handle, [seq for _, seq in indexed], topk if is_teacher else 0,
                                           width=1 + (2 * topk if is_teacher else topk))
            handle.stats.seconds += time.perf_counter() - start
            target = teacher_out if is_teacher else ref_out
            for (index, _), value in zip(indexed, values):
                target[index] = value
        results = []
        for index, teacher in enumerate(teachers):
            cfg = self.cfg.teachers[teacher]
            t_out = teacher_out[index]
            r_out = ref_out[index] if cfg.scored_reference else None
            results.append(SampleScores(
                teacher=teacher, lam=cfg.lam, teacher_logprobs=t_out[:, 0].contiguous(),
                ref_logprobs=None if r_out is None else r_out[:, 0].contiguous(),
                teacher_topk_ids=t_out[:, 1 + topk:].long() if topk else None,
                teacher_topk_logprobs=t_out[:, 1:1 + topk].contiguous() if topk else None,
                ref_topk_logprobs=r_out[:, 1:].contiguous() if topk and r_out is not None else None))
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

    def _check_identical_within_groups(self, signatures: list[Any]) -> None:
        """Ranks of one student model-parallel group must pass the same requests (raises everywhere)."""
        for rank, signature in enumerate(signatures):
            leader = self._student_leaders[rank]
            if signature != signatures[leader]:
                raise ValueError(f"rank {rank} passed other requests than rank {leader} of the same student "
                                 "model-parallel group: ranks holding one data-parallel shard must pass "
                                 "identical request lists to ScoringPool.score")

    def _model_inputs(self, requests: list[ScoreRequest],
                      teachers: list[str]) -> dict[str, list[tuple[int, _Sequence]]]:
        """Per model: (request index, its input sequence) for the requests it must score."""
        inputs: dict[str, list[tuple[int, _Sequence]]] = {name: [] for name in self._models}
        rendered: dict[tuple[int, int], list[int]] = {}  # (id(tokenizer), request) -> prompt ids
        for index, (request, teacher) in enumerate(zip(requests, teachers)):
            reference = self.cfg.teachers[teacher].scored_reference
            for name in (teacher, reference) if reference else (teacher,):
                plan = self._models[name].plan
                prompt = self._prompt_ids(plan, request, index, rendered)
                if not prompt:
                    raise ValueError(f"request {index} (domain {request.domain!r}) has an empty prompt")
                tokens = list(prompt) + list(request.response_ids)
                if min(tokens) < 0 or max(tokens) >= plan.arch.vocab_size:
                    bad = next(t for t in tokens if not 0 <= t < plan.arch.vocab_size)
                    raise ValueError(f"request {index}: token id {bad} is outside the vocabulary of "
                                     f"{plan.label} (vocab_size {plan.arch.vocab_size})")
                inputs[name].append((index, _Sequence(tokens, len(prompt))))
        return inputs

    def _prompt_ids(self, plan: ModelPlan, request: ScoreRequest, index: int,
                    rendered: dict[tuple[int, int], list[int]]) -> list[int]:
        """The prompt in `plan`'s own chat template when it differs from the student's."""
        if not plan.rerender:
            return request.prompt_ids
        if request.messages is None:
            raise ValueError(f"request {index} has no messages, but {plan.label} renders prompts with its "
                             "own chat template: pass ScoreRequest.messages (PromptRecord.messages)")
        key = (id(plan.tokenizer), index)
        if key not in rendered:
            rendered[key] = render_prompt_ids(plan.tokenizer, request.messages, plan.template_kwargs)
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

    def _score_model(self, handle: _PoolModel, sequences: list[_Sequence], topk: int,
                     width: int) -> list[torch.Tensor]:
        """``[response_len, width]`` of each of this rank's sequences under one model (collective):
        the sampled tokens' log-probs, then those of any extra targets, then `topk` top-k log-probs
        and ids (see `_forward`)."""
        if handle.shortcut:
            return self._score_in_place(handle, sequences, topk, width)
        return self._score_redistributed(handle, sequences, topk, width)

    def _score_in_place(self, handle: _PoolModel, sequences: list[_Sequence], topk: int,
                        width: int) -> list[torch.Tensor]:
        """Shortcut: this rank's replica is its student model-parallel group; it scores its shard."""
        grid, device = handle.grid, platform.device()
        micro_batches = _pack_micro_batches([len(s.tokens) for s in sequences], self.cfg.micro_batch_tokens,
                                            handle.plan.layout.tp)
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
        flat = (torch.cat(logprobs) if grid.is_last_stage and logprobs
                else torch.empty((sum(lengths), width), dtype=torch.float32, device=device))
        dist.broadcast(flat, src=grid.last_stage_in_my_pp_group, group=grid.pg_collection.pp)
        return list(flat.split(lengths))

    def _score_redistributed(self, handle: _PoolModel, sequences: list[_Sequence], topk: int,
                             width: int) -> list[torch.Tensor]:
        """General path: all-gather the batch, score each replica's share, all-gather the results."""
        grid, device, rank = handle.grid, platform.device(), dist.get_rank()
        # 1. One rank per student shard contributes its sequences; every rank learns the whole batch.
        mine = sequences if rank == self._student_leader else []
        per_rank = [_decode_sequences(f) for f in _all_gather_varlen(_encode_sequences(mine, device))]
        batch = [(src, i, seq) for src, seqs in enumerate(per_rank) for i, seq in enumerate(seqs)]
        if not batch:
            return []
        # 2. The same assignment on every rank: whole sequences to replicas, balanced by tokens.
        lengths = [len(seq.tokens) for _, _, seq in batch]
        assignment = _balance(lengths, grid.dp_size)
        budget, multiple = self.cfg.micro_batch_tokens, handle.plan.layout.tp
        packed = [_pack_micro_batches([lengths[i] for i in share], budget, multiple) for share in assignment]
        my_share = assignment[grid.dp_rank]
        logprobs = self._forward(handle, [batch[i][2] for i in my_share], packed[grid.dp_rank],
                                 max(len(p) for p in packed), topk)
        # 3. Each replica's writer contributes its results; every rank keeps its own shard's.
        is_writer = rank == grid.writer_of_replica[grid.dp_rank]
        flat = (torch.cat(logprobs).view(-1) if is_writer and logprobs
                else torch.empty(0, dtype=torch.float32, device=device))
        gathered = _all_gather_varlen(flat)
        by_source: dict[tuple[int, int], torch.Tensor] = {}
        for replica, share in enumerate(assignment):
            response_lens = [batch[i][2].response_len for i in share]
            chunks = gathered[grid.writer_of_replica[replica]].view(-1, width).split(response_lens)
            for i, values in zip(share, chunks):
                by_source[batch[i][:2]] = values
        return [by_source[(self._student_leader, i)] for i in range(len(sequences))]

    def _forward(self, handle: _PoolModel, sequences: list[_Sequence], micro_batches: list[list[int]],
                 min_micro_batches: int, topk: int = 0) -> list[torch.Tensor]:
        """Run this replica's sequences forward-only; their response log-probs on the last stage.

        `min_micro_batches` pads the schedule with one-token dummy micro-batches (expert-parallel
        peers must run the same number of forwards). Returns ``[response_len, w]`` fp32 tensors on
        the last pipeline stage (every TP rank), an empty list on the other stages. Columns: the
        sampled token's log-prob; then the log-probs of the sequences' ``extra_targets`` (k
        columns), if they have them; then, with `topk`, the model's top-k log-probs and ids.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        model, plan, pgs = handle.model, handle.plan, handle.grid.pg_collection
        multiple = plan.layout.tp
        batches = [_collate(sequences, indices, multiple) for indices in micro_batches]
        if plan.layout.ep > 1:
            batches += [_collate([_Sequence([0], 1)], [0], multiple, dummy=True)
                        for _ in range(min_micro_batches - len(batches))]
        if not batches:
            return []
        results: list[Optional[torch.Tensor]] = [None] * len(sequences)

        def loss_func(batch: _MicroBatch, output: torch.Tensor):
            logits = output.transpose(0, 1)  # [s, b, V/tp] this TP rank's vocabulary shard
            logprobs = token_logprobs_from_logits(logits, batch.targets, tp_group=pgs.tp,
                                                  vocab_size=plan.arch.vocab_size)  # [s, b(, 1 + k)] fp32
            if logprobs.dim() == 2:
                logprobs = logprobs.unsqueeze(-1)
            if topk:
                values, ids = topk_logprobs_from_logits(logits, topk, tp_group=pgs.tp,
                                                        vocab_size=plan.arch.vocab_size)  # [s, b, k]
                logprobs = torch.cat([logprobs, values, ids.float()], dim=-1)
            for row, index in enumerate(batch.indices):
                seq = sequences[index]
                # Position t predicts token t + 1: the response starts at the model's prompt length.
                start = seq.prompt_len - 1
                results[index] = logprobs[start:start + seq.response_len, row].clone()
            return output.new_zeros(()), {}

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            return model(batch.tokens, batch.positions, None), lambda output: loss_func(batch, output)

        kwargs: dict[str, Any] = {"pg_collection": pgs}
        if plan.layout.pp > 1:
            kwargs["p2p_communicator"] = P2PCommunicator(pp_group=pgs.pp, config=model.config)
        schedule = get_forward_backward_func(pp_size=plan.layout.pp, vp_size=None)
        with torch.no_grad():
            schedule(forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                     num_microbatches=len(batches), seq_length=max(b.tokens.shape[1] for b in batches),
                     micro_batch_size=max(b.tokens.shape[0] for b in batches), forward_only=True, **kwargs)
        real = [b for b in batches if not b.dummy]
        stats = handle.stats
        stats.sequences += len(sequences)
        stats.tokens += sum(len(s.tokens) for s in sequences)
        stats.padded_tokens += sum(b.tokens.numel() for b in real)
        stats.micro_batches += len(real)
        if not handle.grid.is_last_stage:
            return []
        assert all(r is not None for r in results), "a sequence was packed into no micro-batch"
        return results  # type: ignore[return-value]
