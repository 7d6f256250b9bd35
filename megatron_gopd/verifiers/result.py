"""The result every verifier returns, and the status vocabulary shared by all verifiers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Machine-readable outcome of one verification. Evaluation code counts these (e.g. the timeout
# rate); `detail` carries the human-readable reason.
CORRECT = "correct"  # the response was checked and is right: reward 1
WRONG = "wrong"  # checked and wrong (different answer, wrong output, failed assertion)
NO_ANSWER = "no_answer"  # nothing to check: no final answer / no code block in the response
TIMEOUT = "timeout"  # the check ran out of time (slow candidate program, pathological expression)
ERROR = "error"  # the candidate crashed (syntax error, exception, memory) or the verifier failed

STATUSES = (CORRECT, WRONG, NO_ANSWER, TIMEOUT, ERROR)


@dataclass(frozen=True)
class VerifierResult:
    """Outcome of verifying one response against one sample.

    Attributes:
        reward: the outcome reward, 1.0 when correct and 0.0 otherwise.
        status: one of `STATUSES` (``"correct"``, ``"wrong"``, ``"no_answer"``, ``"timeout"``,
            ``"error"``).
        verifier: registry name of the verifier that produced this result (``"math"``, ``"code"``).
        extracted: what was extracted from the response and checked (the final answer, or the
            program), ``None`` when nothing could be extracted.
        detail: a short human-readable explanation, for logs and debugging.
    """

    reward: float
    status: str
    verifier: str
    extracted: Optional[str] = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown verifier status {self.status!r}; expected one of {STATUSES}")

    @property
    def correct(self) -> bool:
        """True when the response was verified correct (``status == "correct"``)."""
        return self.status == CORRECT

    @classmethod
    def make(cls, status: str, verifier: str, extracted: Optional[str] = None, detail: str = "") -> "VerifierResult":
        """Build a result whose reward follows from its status (1.0 iff correct)."""
        return cls(
            reward=1.0 if status == CORRECT else 0.0,
            status=status,
            verifier=verifier,
            extracted=extracted,
            detail=detail,
        )
