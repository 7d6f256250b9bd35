"""Evaluation: outcome verifiers (math answers, sandboxed code), avg@k, and the ExPO baseline.

Modules:
    result          VerifierResult and the status vocabulary
    math_verifier   final-answer extraction + math-verify equivalence, in worker processes
    code_sandbox    resource-limited subprocess runs of untrusted Python
    code_verifier   program extraction + stdin/stdout or assert tests, via the sandbox
    verifiers       the registry: verifier per sample (``verifier``/``domain``), score, score_batch
    expo            theta_base + alpha * (theta_teacher - theta_base) over HF checkpoints
    avg_at_k        avg@k / pass@k aggregation and the sampling + verification loop
    eval_job        the `gopd-eval` job (model loading, data, report)
(expo, avg_at_k and eval_job import torch or megatron-core, so they are not imported here.)

Importing this package is cheap (standard library only).
"""

from megatron_gopd.evaluation.code_sandbox import ExecutionResult, SandboxConfig, run_python
from megatron_gopd.evaluation.code_verifier import CodeVerifier, extract_program
from megatron_gopd.evaluation.math_verifier import (
    MathVerifier,
    MathVerifierConfig,
    extract_final_answer,
)
from megatron_gopd.evaluation.result import VerifierResult
from megatron_gopd.evaluation.verifiers import (
    UnknownVerifierError,
    Verifier,
    VerifierRegistry,
    default_registry,
    score,
    score_batch,
)

__all__ = [
    "CodeVerifier",
    "ExecutionResult",
    "MathVerifier",
    "MathVerifierConfig",
    "SandboxConfig",
    "UnknownVerifierError",
    "Verifier",
    "VerifierRegistry",
    "VerifierResult",
    "default_registry",
    "extract_final_answer",
    "extract_program",
    "run_python",
    "score",
    "score_batch",
]
