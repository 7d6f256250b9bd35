"""The scoring configs: which teachers score which prompt domains, their references, and batching.

Value checks that need no files live here (`ScoringConfig.value_problems`, run on construction);
checks against the checkpoints are `megatron_gopd.scoring.plan.validate_scoring_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from megatron_gopd.models import ModelConfig

__all__ = [
    "STUDENT_INIT",
    "PoolModelConfig",
    "ScoringConfig",
    "ScoringConfigError",
    "TeacherConfig",
    "UnroutedDomainError",
    "format_problems",
]

STUDENT_INIT = "student_init"
"""Reference name for the student's initial checkpoint, loaded once at the student's layout."""


class ScoringConfigError(ValueError):
    """A scoring setup that cannot work; the message lists every problem found, one per line."""


class UnroutedDomainError(ValueError):
    """A prompt domain that no teacher scores."""


@dataclass
class PoolModelConfig(ModelConfig):
    """A forward-only model of the pool (a teacher or a reference): a checkpoint and its own layout
    (`ModelConfig`, independent of the student's), plus how it renders prompts."""

    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Variables for this model's chat template (e.g. ``enable_thinking``). Setting any makes the
    model render prompts itself even when its template equals the student's."""


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
        return [
            f"reference: null is allowed only with lam == 1 (plain OPD, where the reference "
            f"drops out); lam={lam} needs a reference: {STUDENT_INIT!r} or a key of "
            "scoring.references"
        ]
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
    while it scores: the pool's GPU footprint becomes one model plus activations, at the price of one
    host-to-device copy of each model's weights per `ScoringPool.score` call. Ignored on CPU."""

    def __post_init__(self) -> None:
        # A generic YAML loader or a caller may hand nested configs over as plain dicts.
        self.teachers = {name: TeacherConfig(**t) if isinstance(t, dict) else t for name, t in self.teachers.items()}
        self.references = {
            name: PoolModelConfig(**r) if isinstance(r, dict) else r for name, r in self.references.items()
        }
        problems = self.value_problems()
        if problems:
            raise ScoringConfigError(format_problems("scoring config", problems))

    def value_problems(self) -> list[str]:
        """Checks that need no files: values, names, routing, reference names."""
        problems = []
        if self.micro_batch_tokens < 1:
            problems.append(f"micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        for kind, names in (("teachers", self.teachers), ("references", self.references)):
            if STUDENT_INIT in names:
                problems.append(
                    f"{kind} may not be named {STUDENT_INIT!r}: the name is reserved for the "
                    "student's initial checkpoint"
                )
        for name in sorted(set(self.teachers) & set(self.references)):
            problems.append(f"{name!r} names both a teacher and a reference; give them distinct names")
        owner: dict[str, str] = {}
        for name, teacher in self.teachers.items():
            problems += [f"teacher {name!r}: {p}" for p in _teacher_value_problems(teacher)]
            if not teacher.domains:
                problems.append(f"teacher {name!r} has no domains: list the prompt domains it scores")
            for domain in teacher.domains:
                if domain in owner:
                    problems.append(
                        f"domain {domain!r} is claimed by teachers {owner[domain]!r} and "
                        f"{name!r}; route each domain to one teacher"
                    )
                owner.setdefault(domain, name)
            ref = teacher.reference
            if ref is not None and ref != STUDENT_INIT and ref not in self.references:
                known = sorted({STUDENT_INIT, *self.references})
                problems.append(
                    f"teacher {name!r}: reference {ref!r} is not defined; known: {known} "
                    "(add it under scoring.references)"
                )
        return problems

    def routing(self) -> dict[str, str]:
        """Domain -> teacher name."""
        return {domain: name for name, teacher in self.teachers.items() for domain in teacher.domains}


def format_problems(what: str, problems: Sequence[str]) -> str:
    """One message listing every problem of `what`, one per line."""
    return f"{what} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems)
