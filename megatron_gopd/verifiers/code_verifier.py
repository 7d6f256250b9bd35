"""Code verifier: extract the program from a response and run it against the sample's tests.

Program extraction (`extract_program`): the last complete fenced block tagged ``python``, ``py`` or
``python3``; if there is none, the last complete untagged fenced block. An unclosed fence at the end
of a truncated response does not count.

Test formats (the sample's ``tests`` field):

(a) stdin/stdout cases, ``[{"input": "1 2\\n", "output": "3\\n"}, ...]``: the program runs once
    per case with ``input`` on stdin; its stdout must equal ``output`` after `normalize_output`
    (trailing whitespace of every line and trailing blank lines ignored). The APPS-style column
    form ``{"inputs": [...], "outputs": [...]}`` is accepted too.
(b) assert-style test code, a string such as ``"assert add(1, 2) == 3"``: appended to the program
    (after a newline) and run once with empty stdin; it passes when the process exits with code 0
    *and* ran to its last line: the sandbox appends a line that prints a random nonce the program
    is not told (see `code_sandbox.run_python`'s ``prove_completion``), so ``sys.exit(0)`` or
    ``os._exit(0)`` before or between the asserts scores "wrong", not 1.

A JSON string holding format (a) is decoded first (datasets often store tests as JSON text). All
cases must pass for reward 1; the run stops at the first failing case. Every run goes through
`code_sandbox.run_python`, so hangs, fork bombs, memory, file or directory bombs fail the sample
only (see that module for what the sandbox isolates). A host where the sandbox cannot isolate
raises `code_sandbox.SandboxUnavailableError` on the first code sample instead of scoring it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from megatron_gopd.verifiers.code_sandbox import ExecutionResult, SandboxConfig, run_python
from megatron_gopd.verifiers.result import (
    CORRECT,
    ERROR,
    NO_ANSWER,
    TIMEOUT,
    WRONG,
    VerifierResult,
)

VERIFIER_NAME = "code"

_FENCE = "```"
_FENCE_TAG_RE = re.compile(r"[ \t]*([\w+-]*)")  # right after the opening fence
_PYTHON_TAGS = ("python", "py", "python3")


@dataclass(frozen=True)
class IOCase:
    """One stdin/stdout test case."""

    input: str
    output: str


Tests = Union[str, Sequence[Mapping[str, Any]], Mapping[str, Sequence[Any]]]


def extract_program(response: str) -> Optional[str]:
    """The program in ``response`` (see the module docstring for the rule), or None."""
    tagged, untagged = None, None
    for tag, body in _fenced_blocks(response):
        if tag in _PYTHON_TAGS:
            tagged = body
        elif not tag:
            untagged = body
    program = tagged if tagged is not None else untagged
    return program if program and program.strip() else None


def _fenced_blocks(text: str) -> Iterator[tuple[str, str]]:
    """(lower-cased tag, body) of every complete fenced block, in one left-to-right pass.

    A block is an opening fence, its tag and the rest of that line, then everything up to the next
    fence. Plain ``str.find`` keeps it linear: a regex scan restarted the rest-of-line match at
    every backtick of an unterminated flood of fences (quadratic: 12 s for 60k characters).
    """
    pos = 0
    while (start := text.find(_FENCE, pos)) != -1:
        newline = text.find("\n", start + len(_FENCE))
        if newline == -1:
            return  # no later fence can start a block either: they all need this newline
        end = text.find(_FENCE, newline + 1)
        if end == -1:
            return  # an unclosed block (truncated response) does not count
        tag = _FENCE_TAG_RE.match(text, start + len(_FENCE), newline).group(1)
        yield tag.lower(), text[newline + 1 : end]
        pos = end + len(_FENCE)


def normalize_output(text: str) -> str:
    """Output as compared: unified line endings, no trailing spaces, no trailing blank lines."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).rstrip("\n")


def parse_tests(tests: Tests) -> Union[str, list[IOCase]]:
    """Turn a sample's ``tests`` into assert code (str) or a list of `IOCase`.

    Raises ValueError for an empty or malformed test spec: a sample without tests would reward
    every program, which is a dataset bug, not a wrong answer.
    """
    if isinstance(tests, str):
        decoded = _json_or_none(tests)
        if decoded is None:
            if not tests.strip():
                raise ValueError("code sample has empty test code")
            return tests
        tests = decoded
    if isinstance(tests, Mapping):  # APPS-style columns
        inputs, outputs = tests.get("inputs"), tests.get("outputs")
        if inputs is None or outputs is None or len(inputs) != len(outputs):
            raise ValueError("column-form tests need 'inputs' and 'outputs' of equal length")
        tests = [{"input": i, "output": o} for i, o in zip(inputs, outputs)]
    cases = []
    for case in tests:
        if not isinstance(case, Mapping) or "input" not in case or "output" not in case:
            raise ValueError(f"stdin/stdout test case needs 'input' and 'output': {case!r:.200}")
        cases.append(IOCase(str(case["input"]), str(case["output"])))
    if not cases:
        raise ValueError("code sample has no test cases")
    return cases


def _json_or_none(text: str) -> Any:
    stripped = text.lstrip()
    if not stripped.startswith(("[", "{")):
        return None
    try:
        decoded = json.loads(stripped)
    except ValueError:
        return None
    return decoded if isinstance(decoded, (list, dict)) else None


class CodeVerifier:
    """Scores code responses: reward 1 when the extracted program passes all of the sample's tests.

    Sample fields: ``tests`` (see the module docstring). Thread-safe: each call runs its own
    sandboxed subprocesses.
    """

    name = VERIFIER_NAME

    def __init__(self, config: Optional[SandboxConfig] = None) -> None:
        self.config = config or SandboxConfig()

    def __call__(self, sample: Mapping[str, Any], response: str) -> VerifierResult:
        """Score ``response`` against ``sample["tests"]``; ValueError for missing or bad tests."""
        if sample.get("tests") is None:
            raise ValueError("code sample has no 'tests' field")
        return self.verify(response, sample["tests"])

    def verify(self, response: str, tests: Tests) -> VerifierResult:
        """Extract the program from ``response`` and run it against ``tests``."""
        parsed = parse_tests(tests)
        program = extract_program(response)
        if program is None:
            return VerifierResult.make(NO_ANSWER, self.name, detail="no fenced python code block")
        if isinstance(parsed, str):
            return self._run_asserts(program, parsed)
        return self._run_cases(program, parsed)

    def _run_asserts(self, program: str, test_code: str) -> VerifierResult:
        run = run_python(program + "\n\n" + test_code + "\n", "", self.config, prove_completion=True)
        if run.succeeded:
            return VerifierResult.make(CORRECT, self.name, program, "all asserts passed")
        return VerifierResult.make(_failure_status(run), self.name, program, run.describe())

    def _run_cases(self, program: str, cases: list[IOCase]) -> VerifierResult:
        for index, case in enumerate(cases, start=1):
            run = run_python(program, case.input, self.config)
            where = f"case {index}/{len(cases)}"
            if not run.succeeded:
                status = _failure_status(run)
                return VerifierResult.make(status, self.name, program, f"{where}: {run.describe()}")
            if normalize_output(run.stdout) != normalize_output(case.output):
                return VerifierResult.make(WRONG, self.name, program, f"{where}: wrong output")
        return VerifierResult.make(CORRECT, self.name, program, f"{len(cases)} cases passed")


def _failure_status(run: ExecutionResult) -> str:
    if run.sandbox_error is not None:
        return ERROR
    if run.timed_out:
        return TIMEOUT
    if run.returncode == 0 and run.completed is False:
        return WRONG  # exited cleanly before the last assert: the tests did not all pass
    stderr_lines = run.stderr.strip().splitlines()
    if stderr_lines and stderr_lines[-1].startswith("AssertionError"):
        return WRONG  # a failed test, as opposed to a crash
    return ERROR


__all__ = ["CodeVerifier", "IOCase", "extract_program", "normalize_output", "parse_tests"]
