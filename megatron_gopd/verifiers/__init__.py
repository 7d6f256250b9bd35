"""Outcome verifiers: score one response for one dataset sample with a reward and a status.

Owns:
    result          VerifierResult and the status vocabulary
    math_verifier   final-answer extraction + math-verify equivalence, in worker processes
    _math_worker    the worker process math_verifier talks to over stdin/stdout
    code_sandbox    isolated (namespaces), resource-limited runs of untrusted Python
    _sandbox_init   the launcher code_sandbox runs (namespaces, private root, pid 1, limits)
    code_verifier   program extraction + stdin/stdout or assert tests, via the sandbox
    registry        the verifier per sample (``verifier``/``domain``), score, score_batch

May import: the standard library and math-verify (only inside the worker processes). Nothing from
the rest of megatron_gopd, so that the trainer, the `gopd-eval` job (`megatron_gopd.evaluation`)
and scripts can all use it without pulling in torch or megatron-core. Importing it is cheap.
"""

from megatron_gopd.verifiers.code_sandbox import (
    ExecutionResult,
    SandboxConfig,
    SandboxUnavailableError,
    check_sandbox,
    run_python,
)
from megatron_gopd.verifiers.code_verifier import CodeVerifier, extract_program
from megatron_gopd.verifiers.math_verifier import (
    MathVerifier,
    MathVerifierConfig,
    extract_final_answer,
)
from megatron_gopd.verifiers.registry import (
    UnknownVerifierError,
    Verifier,
    VerifierRegistry,
    default_registry,
    score,
    score_batch,
)
from megatron_gopd.verifiers.result import VerifierResult

__all__ = [
    "CodeVerifier",
    "ExecutionResult",
    "MathVerifier",
    "MathVerifierConfig",
    "SandboxConfig",
    "SandboxUnavailableError",
    "UnknownVerifierError",
    "Verifier",
    "VerifierRegistry",
    "VerifierResult",
    "check_sandbox",
    "default_registry",
    "extract_final_answer",
    "extract_program",
    "run_python",
    "score",
    "score_batch",
]
