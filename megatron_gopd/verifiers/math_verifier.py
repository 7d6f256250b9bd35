"""Math verifier: extract the final answer from a response and check it against the reference.

Answer extraction policy (`extract_final_answer`), first rule that finds something wins:

1. ``boxed``: the content of the last *complete* ``\\boxed{...}`` (or ``\\fbox{...}``), nested
   braces handled, escaped braces ``\\{ \\}`` ignored when matching. An unclosed ``\\boxed{`` at
   the end of a truncated response is skipped, so the last closed one counts. ``\\boxed 5`` (no
   braces) gives ``5``. An empty last ``\\boxed{}`` is the response's answer: none (the fallbacks
   do not apply, so neither "the answer is \\boxed{}" nor a number written before it counts).
2. ``answer_is`` (fallback): the text after the last "answer is" / "answer:" (case-insensitive) up
   to the end of that line, with surrounding ``$`` and a trailing period removed.
3. ``last_number`` (fallback): the last number in the response (``-3``, ``1,000``, ``2.5``,
   ``3/4``).

The fallbacks can be switched off (`MathVerifierConfig.fallback`) to reward only boxed answers.
Extraction is a single linear pass, so a huge adversarial response costs O(length).

Equivalence is decided by the ``math-verify`` library (``parse`` + ``verify``), so ``1/2``, ``0.5``
and ``\\frac{1}{2}`` match, as do ``x = 2`` and ``2``. math-verify runs in worker subprocesses (see
`_math_worker` for why): calls are safe from any thread, a pathological expression costs at most
`MathVerifierConfig.timeout_s` and a worker restart, and never hangs the caller.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from megatron_gopd.verifiers.result import ERROR, NO_ANSWER, TIMEOUT, VerifierResult

logger = logging.getLogger(__name__)

VERIFIER_NAME = "math"

# ----------------------------------------------------------------------------------------------
# Answer extraction


@dataclass(frozen=True)
class ExtractedAnswer:
    """A final answer found in a response.

    Attributes:
        text: the answer as written (LaTeX allowed), stripped.
        method: which rule found it: ``"boxed"``, ``"answer_is"`` or ``"last_number"``.
    """

    text: str
    method: str


_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS_RE = re.compile(r"answer(?:\s+is|\s*:)\s*(?:[:=]\s*)?(.+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_BARE_TOKEN_RE = re.compile(r"[^\s$]+")  # the answer of "\boxed 5": up to whitespace or "$"


def _matching_braces(text: str) -> dict[int, int]:
    """Map the index of every balanced ``{`` to the index of its ``}`` in one pass.

    Braces preceded by a backslash (``\\{``, ``\\}``: literal braces in LaTeX) are not counted.
    """
    matches: dict[int, int] = {}
    stack: list[int] = []
    escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            matches[stack.pop()] = i
    return matches


def last_boxed(text: str) -> Optional[str]:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, else None.

    Nested braces are kept (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); an unclosed trailing
    ``\\boxed{`` is skipped in favour of the previous complete one.
    """
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    if not starts:
        return None
    closing = _matching_braces(text)
    for start in reversed(starts):
        pos = start
        while pos < len(text) and text[pos] == " ":
            pos += 1
        if pos < len(text) and text[pos] == "{":
            if pos in closing:
                return text[pos + 1 : closing[pos]].strip()
        elif pos > start:  # "\boxed 5"
            # Matched in place: slicing text[pos:] here made a flood of "\boxed $" quadratic.
            token = _BARE_TOKEN_RE.match(text, pos)
            if token:
                return token.group(0)
    return None


def _answer_after_phrase(text: str) -> Optional[str]:
    """The text after the last "answer is" / "answer:", up to the end of its line."""
    found = None
    for found in _ANSWER_IS_RE.finditer(text):
        pass
    if found is None:
        return None
    answer = found.group(1).strip().strip("$").strip()
    answer = answer.rstrip(".").strip().strip("$").strip()
    return answer or None


def _last_number(text: str) -> Optional[str]:
    found = None
    for found in _NUMBER_RE.finditer(text):
        pass
    return found.group(0).rstrip(",") if found else None


def extract_final_answer(response: str, fallback: bool = True) -> Optional[ExtractedAnswer]:
    """Find the final answer in a model response, following the module's extraction policy.

    Args:
        response: the model's response text.
        fallback: when True, use the "answer is X" and last-number rules if there is no complete
            ``\\boxed{}``; when False only boxed answers count.

    Returns:
        The answer and the rule that found it, or None when the response has no answer.
    """
    boxed = last_boxed(response)
    if boxed is not None:  # the model's last boxed answer is final, even when it is empty
        return ExtractedAnswer(boxed, "boxed") if boxed else None
    if not fallback:
        return None
    phrase = _answer_after_phrase(response)
    if phrase:
        return ExtractedAnswer(phrase, "answer_is")
    number = _last_number(response)
    return ExtractedAnswer(number, "last_number") if number else None


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class MathVerifierConfig:
    """Limits and policy of the math verifier."""

    timeout_s: float = 5.0
    """Hard wall-clock limit for one comparison (parse both answers and verify). Past it the worker
    process is killed and restarted, and the sample scores 0 with status "timeout"."""

    max_workers: int = 2
    """Worker processes, i.e. comparisons that may run at the same time (one per calling thread)."""

    memory_bytes: int = 4 * 1024**3
    """RLIMIT_AS of each worker: a pathological expression fails with MemoryError. 0: no limit."""

    max_answer_chars: int = 1000
    """Longer extracted answers are not parsed and score 0 (bounds the work per sample)."""

    fallback: bool = True
    """Accept "answer is X" / last-number answers when there is no complete ``\\boxed{}``."""

    startup_timeout_s: float = 120.0
    """How long a new worker may take to import math-verify and sympy (slow on a busy machine)."""

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers}")
        if self.memory_bytes < 0 or self.max_answer_chars < 1 or not self.startup_timeout_s > 0:
            raise ValueError(f"invalid math verifier limits: {self}")

    @property
    def op_timeout_s(self) -> int:
        """math-verify's own per-operation limit: whole seconds, below the hard limit if possible.

        Its signal-based timeouts end a slow parse cleanly (no worker restart); half the budget
        leaves room for the parse of the other answer before the hard limit kills the worker.
        """
        return max(1, math.floor(self.timeout_s / 2))


# ----------------------------------------------------------------------------------------------
# Worker processes


class WorkerTimeout(Exception):
    """A math worker did not answer within its deadline."""


class _MathWorker:
    """One `_math_worker` subprocess and the JSON-lines channel to it. Not thread-safe."""

    def __init__(self, config: MathVerifierConfig) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        # It parses untrusted text, so it gets no secrets from our environment: only what Python
        # needs, plus this package on the path (so it works without an installed package).
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from megatron_gopd.verifiers._math_worker import main; main()",
                str(config.op_timeout_s),
                str(config.memory_bytes),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self._buffer = b""
        try:
            ready = self._read_reply(time.monotonic() + config.startup_timeout_s)
        except WorkerTimeout:
            self.kill()
            raise RuntimeError(
                f"math worker did not start within {config.startup_timeout_s}s (is math-verify installed?)"
            ) from None
        except BaseException:
            self.kill()
            raise
        if not ready.get("ready"):
            self.kill()
            raise RuntimeError(f"math worker sent {ready!r} instead of its ready message")

    def request(self, pred: str, gold: str, timeout_s: float) -> dict[str, Any]:
        """Send one comparison and wait for its reply; raises WorkerTimeout past ``timeout_s``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"pred": pred, "gold": gold}) + "\n").encode())
        self.proc.stdin.flush()
        return self._read_reply(time.monotonic() + timeout_s)

    def _read_reply(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerTimeout()
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"math worker exited (code {self.proc.poll()})")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def kill(self) -> None:
        """Stop the worker now and reap it."""
        _kill_worker(self.proc)


def _kill_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def _kill_workers(workers: list[_MathWorker]) -> None:
    for worker in workers:
        _kill_worker(worker.proc)
    workers.clear()


# ----------------------------------------------------------------------------------------------
# The verifier


class MathVerifier:
    """Scores math responses: reward 1 when the final answer is equivalent to the reference.

    Thread-safe; each concurrent call uses its own worker process (up to ``config.max_workers``;
    more callers wait). Workers start on first use (about a second: importing sympy) and are
    stopped by `close()`, when the verifier is garbage-collected, or when the parent process exits.

    Sample fields: ``answer`` (the reference final answer, str or number).
    """

    name = VERIFIER_NAME

    def __init__(self, config: Optional[MathVerifierConfig] = None) -> None:
        self.config = config or MathVerifierConfig()
        self._idle: queue.LifoQueue[_MathWorker] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(self.config.max_workers)
        self._all: list[_MathWorker] = []
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _kill_workers, self._all)

    def __call__(self, sample: Mapping[str, Any], response: str) -> VerifierResult:
        """Score ``response`` against ``sample["answer"]``; ValueError if the sample has none."""
        if sample.get("answer") is None:
            raise ValueError("math sample has no 'answer' field (the reference final answer)")
        return self.verify(response, str(sample["answer"]))

    def verify(self, response: str, reference: str) -> VerifierResult:
        """Extract the final answer of ``response`` and compare it with ``reference``."""
        found = extract_final_answer(response, fallback=self.config.fallback)
        if found is None:
            return VerifierResult.make(NO_ANSWER, self.name, detail="no final answer found")
        if len(found.text) > self.config.max_answer_chars:
            return VerifierResult.make(
                NO_ANSWER,
                self.name,
                found.text[:100],
                f"answer longer than {self.config.max_answer_chars} characters",
            )
        reply = self._compare(found.text, reference)
        detail = f"{reply['detail']} ({found.method})"
        return VerifierResult.make(reply["status"], self.name, found.text, detail)

    def close(self) -> None:
        """Stop all worker processes (a later call starts new ones)."""
        with self._lock:
            while not self._idle.empty():
                self._idle.get_nowait()
            _kill_workers(self._all)

    def _compare(self, pred: str, gold: str) -> dict[str, Any]:
        with self._slots:
            worker = self._checkout()
            try:
                reply = worker.request(pred, gold, self.config.timeout_s)
            except WorkerTimeout:
                self._discard(worker)
                limit = self.config.timeout_s
                logger.warning("math comparison exceeded %.1fs; worker restarted", limit)
                return {"status": TIMEOUT, "detail": f"comparison exceeded {limit}s"}
            except (RuntimeError, OSError, ValueError) as exc:  # worker died or sent garbage
                self._discard(worker)
                logger.warning("math worker failed: %s", exc)
                return {"status": ERROR, "detail": f"math worker failed: {exc}"}
            self._idle.put(worker)
            return reply

    def _checkout(self) -> _MathWorker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            worker = _MathWorker(self.config)
            with self._lock:
                self._all.append(worker)
            return worker

    def _discard(self, worker: _MathWorker) -> None:
        worker.kill()
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)


__all__ = [
    "ExtractedAnswer",
    "MathVerifier",
    "MathVerifierConfig",
    "extract_final_answer",
    "last_boxed",
]
