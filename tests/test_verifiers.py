"""Verifiers: math answer extraction and equivalence, the code sandbox's limits, the registry."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from megatron_gopd.verifiers import (
    CodeVerifier,
    MathVerifier,
    MathVerifierConfig,
    SandboxConfig,
    UnknownVerifierError,
    VerifierRegistry,
    extract_final_answer,
    extract_program,
    run_python,
    score,
)
from megatron_gopd.verifiers.code_verifier import normalize_output, parse_tests
from megatron_gopd.verifiers.math_verifier import last_boxed

# Small limits keep the slow cases (hangs, bombs) around a second each.
LIMITS = SandboxConfig(
    wall_timeout_s=1.5,
    cpu_time_s=1,
    memory_bytes=512 * 1024**2,
    file_size_bytes=1024**2,
    max_processes=8,
)
ADD = "a, b = map(int, input().split())\nprint(a + b)"
SANDBOX_MARKER = "-I\x00main.py"  # in the command line of every sandboxed candidate process
ISOLATIONS = ["namespaces", "rlimits"]


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


@pytest.fixture(scope="module")
def math_verifier():
    verifier = MathVerifier(MathVerifierConfig(timeout_s=4.0, max_workers=2))
    yield verifier
    verifier.close()


@pytest.fixture(scope="module")
def code_verifier() -> CodeVerifier:
    return CodeVerifier(LIMITS)


# ----------------------------------------------------------------------------------------------
# Math: extraction


def test_last_boxed_handles_nesting_escapes_and_truncation():
    assert last_boxed(r"so \boxed{\frac{1}{\sqrt{2}}} done") == r"\frac{1}{\sqrt{2}}"
    # The last box wins, and escaped braces do not count.
    assert last_boxed(r"\boxed{1} then \boxed{\{1, 2\}}") == r"\{1, 2\}"
    # A box left open by a truncated response is skipped.
    assert last_boxed(r"first \boxed{3}, then cut off \boxed{\frac{4") == "3"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"$\boxed 5$") == "5"
    assert last_boxed(r"\boxedx{1} no box here") is None


def test_extraction_policy_and_fallbacks():
    assert extract_final_answer(r"The answer is $\frac{1}{2}$.").text == r"\frac{1}{2}"
    assert extract_final_answer(r"The answer is $\frac{1}{2}$.").method == "answer_is"
    assert extract_final_answer("Answer: 12").text == "12"
    found = extract_final_answer("first 3, then 1,000 apples, finally -2.5.")
    assert (found.text, found.method) == ("-2.5", "last_number")
    assert extract_final_answer(r"3 then \boxed{4} then 5").text == "4"  # boxed beats fallbacks
    assert extract_final_answer("The answer is 7.", fallback=False) is None
    assert extract_final_answer("no digits at all") is None


@pytest.mark.parametrize(
    "response", [r"The answer is \boxed{}", r"I think 5, so \boxed{}", r"\boxed{ }", r"\boxed{4} but \boxed{}"]
)
def test_an_empty_last_box_is_no_answer(math_verifier, response):
    """The model's last box is its final answer even when empty: no fallback rule may find one
    (it once extracted the literal text after "the answer is", or a number written before)."""
    assert extract_final_answer(response) is None
    assert math_verifier({"answer": "5"}, response).reward == 0.0


def test_extraction_is_linear_on_adversarial_input():
    text = r"\boxed{" * 40_000 + "1" + "}" * 10  # 280k characters, mostly unclosed boxes
    start = time.monotonic()
    assert last_boxed(text) == "1"
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize(
    "flood",
    [
        "\\boxed $" * 25_000 + "\u00e9",  # a non-ASCII character makes each character 4 bytes
        "\\fbox $" * 28_000 + "\U0001f600",
        "\\boxed " * 25_000 + "\u00e9",
        "answer is " * 20_000 + "\u00e9",
    ],
)
def test_extraction_is_linear_on_a_flood_of_bare_boxes(flood):
    # 200k characters; the slice-per-box extractor took 1.4-2.3 s on these (quadratic).
    start = time.monotonic()
    extract_final_answer(flood)
    assert time.monotonic() - start < 0.5


def test_program_extraction_is_linear_on_a_flood_of_fences():
    # The fence regex restarted its rest-of-line scan at every backtick: 12 s for 60k characters.
    start = time.monotonic()
    assert extract_program("```" * 70_000) is None
    assert extract_program("```python " + "```" * 70_000 + "\nprint(1)\n```") == "print(1)\n"
    assert time.monotonic() - start < 0.5


# ----------------------------------------------------------------------------------------------
# Math: equivalence via math-verify


@pytest.mark.parametrize(
    "response, reference",
    [
        (r"So the probability is \boxed{1/2}.", "0.5"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{\frac{1}{2}}", "1/2"),
        (r"\boxed{\dfrac{2}{4}}", "0.5"),
        (r"we find \boxed{x = 2}", "2"),
        (r"\boxed{\{2, 1\}}", r"\{1, 2\}"),
        ("The answer is 1,000.", "1000"),
    ],
)
def test_equivalent_answers_accepted(math_verifier, response, reference):
    result = math_verifier({"answer": reference}, response)
    assert result.correct and result.reward == 1.0, result


@pytest.mark.parametrize(
    "response, reference",
    [
        (r"\boxed{0.6}", "1/2"),
        (r"\boxed{3}", "4"),
        (r"\boxed{x+1}", "x-1"),
        (r"\boxed{\{1, 3\}}", r"\{1, 2\}"),
    ],
)
def test_wrong_answers_rejected(math_verifier, response, reference):
    result = math_verifier({"answer": reference}, response)
    assert result.status == "wrong" and result.reward == 0.0, result


def test_no_answer_scores_zero(math_verifier):
    result = math_verifier({"answer": "4"}, "I am not sure what the result is.")
    assert (result.status, result.reward, result.extracted) == ("no_answer", 0.0, None)
    strict = MathVerifier(MathVerifierConfig(fallback=False))
    assert strict({"answer": "4"}, "The answer is 4.").status == "no_answer"  # no worker needed


def test_math_sample_without_answer_is_an_error(math_verifier):
    with pytest.raises(ValueError, match="answer"):
        math_verifier({"domain": "math"}, r"\boxed{1}")


def test_pathological_expression_times_out_and_verifier_recovers():
    # A hard limit below math-verify's own 1 s alarm: the worker is killed mid-computation.
    verifier = MathVerifier(MathVerifierConfig(timeout_s=0.5, max_workers=1))
    try:
        assert verifier({"answer": "7"}, r"\boxed{7}").correct  # warm the worker up
        start = time.monotonic()
        result = verifier({"answer": "7"}, r"\boxed{2^{2^{40}}}")
        assert result.status == "timeout" and result.reward == 0.0
        assert time.monotonic() - start < 2.0
        assert verifier({"answer": "7"}, r"\boxed{7}").correct  # a fresh worker took over
    finally:
        verifier.close()


def test_math_verifier_works_from_worker_threads(math_verifier):
    # math-verify's signal-based timeouts raise in non-main threads; ours must not.
    results: list = []

    def check(i: int) -> None:
        results.append(math_verifier({"answer": str(i)}, rf"\boxed{{{i}}}"))

    threads = [threading.Thread(target=check, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(r.correct for r in results)


# ----------------------------------------------------------------------------------------------
# Code: extraction and test formats


def test_extract_program_takes_last_python_block():
    response = "```python\nprint(1)\n```\ntext\n```py\nprint(2)\n```\n```text\nnot code\n```"
    assert extract_program(response) == "print(2)\n"
    assert extract_program("```\nprint(3)\n```") == "print(3)\n"  # untagged fallback
    unclosed = "```python\nprint(1)\n```\n```python\nprint(2)"
    assert extract_program(unclosed) == "print(1)\n"
    assert extract_program("no code here") is None


def test_test_formats_are_parsed():
    cases = parse_tests([{"input": "1\n", "output": "2\n"}])
    assert [(c.input, c.output) for c in cases] == [("1\n", "2\n")]
    assert len(parse_tests({"inputs": ["1", "2"], "outputs": ["2", "3"]})) == 2  # APPS columns
    assert len(parse_tests(json.dumps([{"input": "", "output": "x"}]))) == 1  # JSON text
    assert parse_tests("assert f(1) == 2") == "assert f(1) == 2"
    for bad in ([], "", [{"input": "1"}], {"inputs": ["1"], "outputs": []}):
        with pytest.raises(ValueError):
            parse_tests(bad)
    assert normalize_output("a  \r\nb\n\n") == normalize_output("a\nb")


# ----------------------------------------------------------------------------------------------
# Code: verdicts

ADD_CASES = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"}]


def test_correct_program_passes_io_cases(code_verifier):
    result = code_verifier({"tests": ADD_CASES}, fenced(ADD))
    assert result.correct and result.reward == 1.0, result


def test_wrong_program_fails(code_verifier):
    result = code_verifier({"tests": ADD_CASES}, fenced(ADD.replace("a + b", "a - b")))
    assert (result.status, result.reward) == ("wrong", 0.0)
    assert "case 1/2" in result.detail


def test_syntax_error_fails(code_verifier):
    result = code_verifier({"tests": ADD_CASES}, fenced("def broken(:\n    pass"))
    assert (result.status, result.reward) == ("error", 0.0)
    assert "SyntaxError" in result.detail


def test_assert_style_tests(code_verifier):
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    assert code_verifier({"tests": tests}, fenced("def add(a, b):\n    return a + b")).correct
    wrong = code_verifier({"tests": tests}, fenced("def add(a, b):\n    return a * b"))
    assert (wrong.status, wrong.reward) == ("wrong", 0.0)


def test_missing_code_block_scores_zero(code_verifier):
    assert code_verifier({"tests": ADD_CASES}, "print(1) without a fence").status == "no_answer"


# ----------------------------------------------------------------------------------------------
# Code: sandbox limits (each must fail the sample and nothing else)


def test_infinite_loop_times_out_quickly(code_verifier):
    start = time.monotonic()
    result = code_verifier({"tests": ADD_CASES}, fenced("while True:\n    pass"))
    assert (result.status, result.reward) == ("timeout", 0.0)
    assert time.monotonic() - start < 4.0


def test_cpu_time_limit_applies_before_wall_clock():
    run = run_python("while True:\n    pass", config=SandboxConfig(wall_timeout_s=30, cpu_time_s=1))
    assert run.timed_out and not run.succeeded
    assert run.returncode == -signal.SIGXCPU  # RLIMIT_CPU ended it, not the 30 s wall clock
    assert run.wall_s < 29


def _alive_sandbox_processes(pids: list[int]) -> list[int]:
    """Those of host ``pids`` that are still running candidate programs ("rlimits" mode)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue  # gone
        if state not in ("Z", "X") and SANDBOX_MARKER in cmdline:
            alive.append(pid)
    return alive


def _alive_in_pid_namespace(namespace: str) -> list[int]:
    """Host pids of live processes in pid namespace ``namespace`` (e.g. ``"pid:[4026532301]"``)."""
    alive = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or os.readlink(entry / "ns" / "pid") != namespace:
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone, or not ours to inspect
        if state not in ("Z", "X"):
            alive.append(int(entry.name))
    return alive


# The candidate's first line names its pid namespace; the rest of its output are pids.
PRINT_NAMESPACE = "import os\nprint(os.readlink('/proc/self/ns/pid'), flush=True)\n"


def _assert_nothing_survived(run, isolation: str) -> None:
    first, *rest = run.stdout.split("\n", 1)
    pids = [int(line) for line in "".join(rest).split() if line.isdigit()]
    assert pids, run  # the program did create processes
    if isolation == "namespaces":
        assert first.startswith("pid:[") and first != os.readlink("/proc/self/ns/pid")
        assert _alive_in_pid_namespace(first) == []  # the kernel ended the whole namespace
    else:
        assert _alive_sandbox_processes(pids) == []  # all killed


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_fork_bomb_is_contained_and_parent_survives(isolation):
    bomb = PRINT_NAMESPACE + (
        "while True:\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        continue\n"
        "    if pid == 0:\n"
        "        print(os.getpid(), flush=True)\n"
    )
    config = dataclasses.replace(LIMITS, isolation=isolation)
    run = run_python(bomb, config=config)
    assert not run.succeeded and run.timed_out
    pids = [int(line) for line in run.stdout.split()[1:] if line.isdigit()]
    assert 0 < len(pids) < 64  # children were created, but capped by RLIMIT_NPROC
    _assert_nothing_survived(run, isolation)
    check = subprocess.run([sys.executable, "-c", "print('alive')"], capture_output=True, text=True)
    assert check.stdout == "alive\n"
    assert run_python("print('next sample')", config=config).stdout == "next sample\n"


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_child_escaping_with_setsid_is_killed(isolation):
    if isolation == "rlimits" and os.geteuid() != 0:
        pytest.skip("without namespaces, setsid escapes are caught only with a private uid (root)")
    program = PRINT_NAMESPACE + (
        "import time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(60)\n"
        "else:\n"
        "    print(pid, flush=True)\n"
    )
    run = run_python(program, config=dataclasses.replace(LIMITS, isolation=isolation))
    assert run.succeeded
    _assert_nothing_survived(run, isolation)


def test_huge_allocation_fails(code_verifier):
    result = code_verifier({"tests": "assert True"}, fenced("data = bytearray(10 * 1024**3)"))
    assert (result.status, result.reward) == ("error", 0.0)
    assert "MemoryError" in result.detail
    assert run_python("data = bytearray(50 * 1024**2)", config=LIMITS).succeeded  # below the limit


def test_file_size_bomb_fails(code_verifier):
    bomb = fenced("open('big.bin', 'wb').write(b'x' * (64 * 1024**2))")
    result = code_verifier({"tests": "assert True"}, bomb)
    assert (result.status, result.reward) == ("error", 0.0)
    assert "File too large" in result.detail
    flood = run_python("while True:\n    print('x' * 1000)", config=LIMITS)  # stdout is capped too
    assert not flood.succeeded and len(flood.stdout) <= LIMITS.file_size_bytes


def test_parent_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    run = run_python("import json, os\nprint(json.dumps(dict(os.environ)))", config=LIMITS)
    env = json.loads(run.stdout)
    assert "SECRET_TOKEN" not in env and "hunter2" not in run.stdout
    allowed = {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR"}
    allowed |= {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}
    assert set(env) <= allowed


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_temporary_directory_is_removed(isolation):
    before = set(Path(tempfile.gettempdir()).glob("gopd-sandbox-*"))
    program = "import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())"
    run = run_python(program, config=dataclasses.replace(LIMITS, isolation=isolation))
    workdir = Path(run.stdout.strip())
    assert run.succeeded
    if isolation == "namespaces":
        assert workdir == Path("/sandbox")  # a tmpfs of the run's own mount namespace
    else:
        assert workdir.parent.name.startswith("gopd-sandbox-")
        assert not workdir.exists()
    assert set(Path(tempfile.gettempdir()).glob("gopd-sandbox-*")) - before == set()


# ----------------------------------------------------------------------------------------------
# Registry


@pytest.fixture(scope="module")
def registry(math_verifier, code_verifier) -> VerifierRegistry:
    return VerifierRegistry({"math": math_verifier, "code": code_verifier})


def test_registry_routes_by_domain_and_verifier_field(registry, math_verifier, code_verifier):
    assert registry.resolve({"domain": "math"}) is math_verifier
    assert registry.resolve({"domain": "code"}) is code_verifier
    assert registry.resolve({"domain": "code", "verifier": "math"}) is math_verifier  # field wins
    assert registry.score({"domain": "math", "answer": "0.5"}, r"\boxed{\frac12}").correct


def test_registry_rejects_unknown_domain_and_verifier(registry):
    with pytest.raises(UnknownVerifierError, match="domain 'chemistry'.*known domains: code, math"):
        registry.resolve({"domain": "chemistry"})
    with pytest.raises(UnknownVerifierError, match="unknown verifier 'lean'"):
        registry.resolve({"domain": "math", "verifier": "lean"})
    with pytest.raises(ValueError, match="already registered"):
        registry.register("math", registry.resolve({"domain": "math"}))


def test_score_batch_keeps_order_and_fails_fast(registry):
    samples = [
        {"domain": "math", "answer": "2"},
        {"domain": "code", "tests": ADD_CASES},
        {"domain": "math", "answer": "3"},
        {"domain": "code", "tests": "assert f() == 1"},
    ]
    responses = [r"\boxed{2}", fenced(ADD), r"\boxed{4}", fenced("def f(): return 1")]
    results = registry.score_batch(samples, responses, max_workers=2)
    assert [r.reward for r in results] == [1.0, 1.0, 0.0, 1.0]
    assert [r.verifier for r in results] == ["math", "code", "math", "code"]
    with pytest.raises(UnknownVerifierError):
        registry.score_batch([*samples, {"domain": "poetry"}], [*responses, "..."])


def test_default_registry_scores_math():
    assert score({"domain": "math", "answer": r"\frac{1}{2}"}, r"\boxed{0.5}").reward == 1.0
