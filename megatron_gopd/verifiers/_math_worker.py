"""The subprocess that runs math-verify: one comparison per request, JSON lines on stdin/stdout.

Why a separate process: math-verify (0.9.0) bounds its sympy work with ``signal.alarm``. That only
works in the main thread of the main interpreter (elsewhere `parse`/`verify` raise ValueError), it
would clobber any other SIGALRM user in the calling process, and a signal handler only runs between
bytecodes, so one long call into a compiled extension is not interrupted until it returns. Here the
worker runs in its own main thread, so math-verify's alarms work as a first, cheap limit (they do
stop e.g. ``7 = 2^{2^{40}}``); the parent (`math_verifier`) enforces a hard wall-clock limit by
killing the worker, and ``RLIMIT_AS`` turns a memory blow-up into a MemoryError instead of an OOM
kill of the host.

Protocol (one JSON object per line):
    parent -> worker: {"pred": "<latex answer>", "gold": "<latex reference>"}
    worker -> parent: {"status": "correct" | "wrong" | "no_answer" | "timeout" | "error",
                       "detail": "..."}
The worker first writes {"ready": true} once math-verify is imported and warmed up, and exits on
end of input (so it dies with its parent).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any, TextIO

# Status strings are duplicated from `result` on purpose: the worker must stay importable with no
# package state, and the parent validates them through VerifierResult anyway.
_CORRECT, _WRONG, _NO_ANSWER, _TIMEOUT, _ERROR = "correct", "wrong", "no_answer", "timeout", "error"


def as_boxed(answer: str) -> str:
    """Wrap a bare answer in ``\\boxed{}`` so math-verify parses it as LaTeX.

    math-verify's LaTeX extraction turns ``\\boxed{0.5}`` into Rational(1, 2) and understands
    ``\\frac``, sets, intervals and ``x = 2``; a bare ``0.5`` would only go through its plain
    expression parser. A reference that already contains ``\\boxed`` is used as is.
    """
    return answer if "\\boxed" in answer else f"\\boxed{{{answer}}}"


def compare(pred: str, gold: str, op_timeout_s: int) -> dict[str, str]:
    """Compare an extracted answer with the reference answer using math-verify.

    Must run in the main thread (math-verify's signal-based timeouts). ``op_timeout_s`` bounds each
    parse and each pairwise comparison inside math-verify (whole seconds, at least 1).
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        gold_parsed = parse(as_boxed(gold), parsing_timeout=op_timeout_s, raise_on_error=True)
        if not gold_parsed:
            return {"status": _ERROR, "detail": f"reference {gold!r} could not be parsed"}
        pred_parsed = parse(as_boxed(pred), parsing_timeout=op_timeout_s, raise_on_error=True)
        if not pred_parsed:
            return {"status": _NO_ANSWER, "detail": "extracted answer could not be parsed"}
        # verify() is not symmetric: the gold answer goes first.
        same = verify(gold_parsed, pred_parsed, timeout_seconds=op_timeout_s, raise_on_error=True)
    except TimeoutException:  # a BaseException subclass in math-verify
        return {"status": _TIMEOUT, "detail": "math-verify timed out"}
    except MemoryError:
        return {"status": _ERROR, "detail": "math-verify ran out of memory"}
    except Exception as exc:  # sympy raises anything on odd input: a wrong answer, not a crash
        return {"status": _WRONG, "detail": f"could not compare: {type(exc).__name__}"}
    if same:
        return {"status": _CORRECT, "detail": "equivalent"}
    return {"status": _WRONG, "detail": "not equivalent"}


def _serve(requests: TextIO, replies: TextIO, op_timeout_s: int) -> None:
    """Answer requests until end of input."""
    for line in requests:
        request: dict[str, Any] = json.loads(line)
        reply = compare(str(request["pred"]), str(request["gold"]), op_timeout_s)
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    """Entry point; argv: OP_TIMEOUT_S MEMORY_BYTES (started by `math_verifier`)."""
    op_timeout_s, memory_bytes = int(sys.argv[1]), int(sys.argv[2])
    # Keep the protocol channel private: anything a library prints goes to stderr instead.
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import math_verify  # noqa: F401  (import before the memory limit: it maps large libraries)

    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    compare("1", "1", op_timeout_s)  # warm up the LaTeX grammar so the first real request is fast
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    _serve(sys.stdin, replies, op_timeout_s)


if __name__ == "__main__":
    main()
