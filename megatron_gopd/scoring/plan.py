"""Validate a scoring setup once and return the plan the pool builds from.

`validate_scoring_config` checks everything a `ScoringPool` needs against the files, on one process
and without building anything (every problem in one `ScoringConfigError`), and returns a
`ScoringPlan`: per model its resolved checkpoint, layout, dtype, architecture, tokenizer directory
and whether it renders prompts with its own chat template. The plan is a plain dataclass of plain
values (picklable; `to_dict` / `from_dict` give JSON), so the launcher can validate and the ranks
reuse the result::

    plan = validate_scoring_config(cfg.scoring, student_checkpoint=ckpt, student_layout=layout,
                                   world_size=world)          # once, e.g. in the launcher
    json.dump(plan.to_dict(), f)                              # hand it to the ranks, if need be
    pool = ScoringPool(cfg.scoring, student_checkpoint=ckpt, student_layout=layout,
                       plan=ScoringPlan.from_dict(json.load(f)))   # no re-validation, no tokenizer
                                                                    # loads beyond those it renders with
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from megatron_gopd.bridge.safetensors_io import CheckpointError
from megatron_gopd.checkpointing import HF_SUBDIR, read_checkpoint_meta
from megatron_gopd.config import from_dict, to_dict
from megatron_gopd.data import check_template_kwargs
from megatron_gopd.models import ModelArchitecture, ParallelLayout
from megatron_gopd.packing import PackingMode, packing_enabled
from megatron_gopd.scoring.config import (
    STUDENT_INIT,
    PoolModelConfig,
    ScoringConfig,
    ScoringConfigError,
    format_problems,
)

logger = logging.getLogger(__name__)

__all__ = ["ModelPlan", "ScoringPlan", "load_tokenizer", "planned_models", "validate_scoring_config"]

# Files whose presence means <ckpt>/hf/ carries a tokenizer that AutoTokenizer can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class ModelPlan:
    """A model the pool will build, resolved from the config and checked against the files."""

    name: str
    role: Literal["teacher", "reference"]
    checkpoint: str
    layout: ParallelLayout
    dtype: str
    """Resolved: the config's, else the dtype the checkpoint was converted in."""
    arch: ModelArchitecture
    tokenizer_dir: Optional[str]
    """``<checkpoint>/hf`` when it holds tokenizer files, else None."""
    template_kwargs: dict[str, Any]
    """Variables for this model's chat template (`PoolModelConfig.chat_template_kwargs`)."""
    rerender: bool
    """Whether prompts are rendered with this model's own chat template (else the student's ids)."""
    attention: str = "auto"
    """The model's core attention (`PoolModelConfig.attention`)."""
    packed: bool = False
    """Whether its forward micro-batches are packed (``packing`` resolved for its attention)."""

    @property
    def label(self) -> str:
        """How messages name this model: role, name and checkpoint."""
        return f"{self.role} {self.name!r} ({self.checkpoint})"


@dataclass
class ScoringPlan:
    """Everything `validate_scoring_config` resolved: what a `ScoringPool` builds, and for what job."""

    student_checkpoint: str
    student_layout: ParallelLayout
    world_size: int
    models: list[ModelPlan]
    """Teachers first (config order), then the references a teacher with ``lam != 1`` uses
    (``student_init`` last). A pool runs them in this order: teachers before references."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (`from_dict` restores it)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScoringPlan":
        """The plan `to_dict` wrote (raises `megatron_gopd.config.ConfigError` on a malformed one)."""
        return from_dict(cls, data, source="scoring plan")

    def check_matches(
        self, cfg: ScoringConfig, *, student_checkpoint: str, student_layout: ParallelLayout, world_size: int
    ) -> None:
        """Refuse (ValueError) a plan made for another job: other student, world size or models."""
        made_for = (self.student_checkpoint, self.student_layout, self.world_size)
        if made_for != (student_checkpoint, student_layout, world_size):
            raise ValueError(
                f"the scoring plan was made for student {made_for[0]} at {made_for[1]} on "
                f"{made_for[2]} ranks, not for {student_checkpoint} at {student_layout} on "
                f"{world_size} ranks: validate the scoring config for this job"
            )
        wanted = planned_models(cfg, student_checkpoint, student_layout)
        same_models = len(wanted) == len(self.models) and all(
            (m.name, m.role, m.checkpoint, m.layout, m.template_kwargs, m.attention)
            == (name, role, model_cfg.checkpoint, layout, model_cfg.chat_template_kwargs, model_cfg.attention)
            and model_cfg.dtype in (None, m.dtype)
            for m, (name, role, model_cfg, layout) in zip(self.models, wanted)
        )
        if not same_models:
            raise ValueError(
                f"the scoring plan ({[m.label for m in self.models]}) does not describe this "
                "scoring config: validate the config again"
            )


def planned_models(
    cfg: ScoringConfig, student_checkpoint: str, student_layout: ParallelLayout
) -> list[tuple[str, str, PoolModelConfig, ParallelLayout]]:
    """(name, role, config, layout) of every model a pool for `cfg` builds, in the plan's order.

    Teachers, then the references some teacher with ``lam != 1`` uses (``student_init``, at the
    student's layout, last).
    """
    used = _used_references(cfg)
    return [
        model
        for model in _configured_models(cfg, student_checkpoint, student_layout)
        if model[1] == "teacher" or model[0] in used
    ]


def _configured_models(
    cfg: ScoringConfig, student_checkpoint: str, student_layout: ParallelLayout
) -> list[tuple[str, str, PoolModelConfig, ParallelLayout]]:
    """Every configured model, used or not, plus ``student_init`` when a teacher uses it."""
    models = [(name, "teacher", t.model, t.model.layout) for name, t in cfg.teachers.items()]
    models += [(name, "reference", r, r.layout) for name, r in cfg.references.items()]
    if STUDENT_INIT in _used_references(cfg):
        models.append((STUDENT_INIT, "reference", PoolModelConfig(checkpoint=student_checkpoint), student_layout))
    return models


def _used_references(cfg: ScoringConfig) -> set[str]:
    return {t.scored_reference for t in cfg.teachers.values()} - {None}


def load_tokenizer(hf_dir: str, cache: dict[str, Any]) -> Any:
    """AutoTokenizer from `hf_dir`, loaded once per resolved path into `cache`."""
    key = str(Path(hf_dir).resolve())
    if key not in cache:
        from transformers import AutoTokenizer

        cache[key] = AutoTokenizer.from_pretrained(hf_dir)
    return cache[key]


# ----------------------------------------------------------------------------------------------
# Validation (no process groups, no models): the same on every rank


class _CheckedCheckpoint:
    """A checkpoint's architecture and tokenizer, or the problems that prevent using it."""

    def __init__(self, role: str, label: str, checkpoint: str, tokenizers: dict[str, Any]) -> None:
        self.role = role
        self.label = label
        self.arch: Optional[ModelArchitecture] = None
        self.tokenizer: Any = None
        self.tokenizer_dir: Optional[str] = None
        self.meta: dict[str, Any] = {}
        self.problems: list[str] = []
        if not checkpoint:
            self.problems.append(f"{label}: no checkpoint given")
            return
        if not Path(checkpoint).is_dir():
            self.problems.append(f"{label}: checkpoint {checkpoint} does not exist")
            return
        hf_dir = Path(checkpoint) / HF_SUBDIR
        try:
            self.meta = read_checkpoint_meta(checkpoint)
            self.arch = ModelArchitecture.from_pretrained(hf_dir)
        except (CheckpointError, FileNotFoundError, ValueError) as err:
            self.problems.append(f"{label}: {err}")
            return
        if any((hf_dir / name).is_file() for name in _TOKENIZER_FILES):
            self.tokenizer_dir = str(hf_dir)
            self.tokenizer = load_tokenizer(self.tokenizer_dir, tokenizers)

    def check_layout(self, layout: ParallelLayout, world_size: int) -> None:
        """Record why `layout` cannot hold this model on `world_size` ranks, if it cannot."""
        tp, pp = layout.tp, layout.pp
        if world_size % (tp * pp):
            self.problems.append(
                f"{self.label}: tp x pp = {tp} x {pp} = {tp * pp} does not divide the world size {world_size}"
            )
            return
        if (world_size // pp) % (layout.ep * layout.expert_tp):
            self.problems.append(
                f"{self.label}: ep x expert tp = {layout.ep} x {layout.expert_tp} does "
                f"not divide world / pp = {world_size // pp}"
            )
        if self.arch is not None:
            try:
                self.arch.validate_parallel(tp, pp, layout.ep, layout.etp)
            except ValueError as err:
                self.problems.append(f"{self.label}: {err}")


def _vocabulary_problem(model: _CheckedCheckpoint, student: _CheckedCheckpoint) -> Optional[str]:
    """Why `model` cannot score the student's tokens, or None when the vocabularies agree.

    Both models must have the same ``vocab_size``, and token ids must mean the same string in both;
    compared on the tokenizers' ``get_vocab()`` (added tokens included) when both have one.
    """
    if model.arch is None or student.arch is None:
        return None
    if model.arch.vocab_size != student.arch.vocab_size:
        # Even with one tokenizer: a teacher's softmax over extra rows is another distribution, and
        # its top-k ids could index past the student's output layer.
        return (
            f"{model.label} has vocab_size {model.arch.vocab_size} in {HF_SUBDIR}/config.json but the "
            f"student ({student.label}) has {student.arch.vocab_size}: teacher, reference and student "
            "must have the same vocabulary size (same tokenizer, same embedding rows)"
        )
    if model.tokenizer is None or student.tokenizer is None:
        logger.warning(
            "%s or the student has no tokenizer files in %s/: comparing vocab_size only", model.label, HF_SUBDIR
        )
        return None
    model_vocab, student_vocab = model.tokenizer.get_vocab(), student.tokenizer.get_vocab()
    if model_vocab == student_vocab:
        return None
    differing = sorted(set(model_vocab.items()) ^ set(student_vocab.items()), key=lambda kv: (kv[1], kv[0]))
    examples = []
    for token, _ in differing[:3]:
        examples.append(
            f"{token!r} is id {student_vocab.get(token)} in the student, {model_vocab.get(token)} in the {model.role}"
        )
    return (
        f"{model.label} and the student ({student.label}) have different tokenizers "
        f"({len(model_vocab)} vs {len(student_vocab)} tokens; e.g. {'; '.join(examples)}): "
        "teacher, reference and student must share the vocabulary"
    )


def validate_scoring_config(
    cfg: ScoringConfig,
    *,
    student_checkpoint: str,
    student_layout: ParallelLayout,
    world_size: int,
    packing: PackingMode = "auto",
) -> ScoringPlan:
    """Check everything a `ScoringPool` needs, without building anything; return what it will build.

    Checks: the config's values (`ScoringConfig.value_problems`); at least one teacher; every
    teacher / reference checkpoint (and the student's) exists and is a converted checkpoint with a
    supported ``hf/config.json``; each model's vocabulary equals the student's; each model's
    ``tp * pp`` divides `world_size` and its shapes split at that layout; a model whose chat
    template differs from the student's has one. Runs on one process (no collectives); each
    tokenizer is loaded once.

    Returns:
        The plan: teachers first (config order), then the references at least one teacher with
        ``lam != 1`` uses (``student_init`` last); unused references are validated and skipped.

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

    for name, teacher in cfg.teachers.items():
        if teacher.lam == 1.0 and teacher.reference is not None:
            logger.info(
                "teacher %r has lam == 1: its reference %r drops out of the advantage and is not run",
                name,
                teacher.reference,
            )
    used = _used_references(cfg)
    models = []
    for name, role, model_cfg, layout in _configured_models(cfg, student_checkpoint, student_layout):
        plan, model_problems = _check_model(name, role, model_cfg, layout, student, world_size, tokenizers, packing)
        problems += model_problems
        if role == "reference" and name not in used:
            logger.warning("reference %r is defined but no teacher with lam != 1 uses it: not loaded", name)
        elif plan is not None:
            models.append(plan)
    if problems:
        raise ScoringConfigError(format_problems("scoring setup", problems))
    return ScoringPlan(student_checkpoint, student_layout, world_size, models)


def _check_model(
    name: str,
    role: str,
    model_cfg: PoolModelConfig,
    layout: ParallelLayout,
    student: _CheckedCheckpoint,
    world_size: int,
    tokenizers: dict[str, Any],
    packing: PackingMode,
) -> tuple[Optional[ModelPlan], list[str]]:
    """One model's plan (None if unusable) and its problems: files, layout, vocabulary, template,
    packing."""
    checked = _CheckedCheckpoint(role, f"{role} {name!r} ({model_cfg.checkpoint})", model_cfg.checkpoint, tokenizers)
    packed = False
    try:
        field = f"scoring.teachers.{name}.model" if role == "teacher" else f"scoring.references.{name}"
        packed = packing_enabled(packing, model_cfg.attention, f"{checked.label} ({field}.attention)")
    except ValueError as err:
        checked.problems.append(str(err))
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
    plan = ModelPlan(
        name=name,
        role=role,
        checkpoint=model_cfg.checkpoint,
        layout=layout,
        dtype=model_cfg.dtype or checked.meta.get("dtype", "float32"),
        arch=checked.arch,
        tokenizer_dir=checked.tokenizer_dir,
        template_kwargs=dict(model_cfg.chat_template_kwargs),
        rerender=rerender,
        attention=model_cfg.attention,
        packed=packed,
    )
    return plan, []


def _template_problems(model: _CheckedCheckpoint, template_kwargs: dict[str, Any]) -> list[str]:
    """Problems rendering prompts with `model`'s own chat template (it differs from the student's)."""
    if model.tokenizer is None:
        return [
            f"{model.label} has no tokenizer files but must render prompts itself (its chat template "
            "differs from the student's, or it sets chat_template_kwargs): copy the tokenizer into "
            f"its {HF_SUBDIR}/ directory"
        ]
    try:
        check_template_kwargs(model.tokenizer, template_kwargs)
    except ValueError as err:
        return [f"{model.label}: {err}"]
    return []
