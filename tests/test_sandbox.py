"""The code sandbox under attack: isolation from the caller, early exits, memory, leftovers, cleanup.

Each test is a case that failed before the sandbox ran candidates in namespaces (#19). The
ordinary-user cases run the sandbox from a child process switched to uid 65534 with ``setpriv``
when the tests run as root (as on clusters, where the caller is an ordinary user).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from megatron_gopd.verifiers import (
    CodeVerifier,
    SandboxConfig,
    SandboxUnavailableError,
    check_sandbox,
    run_python,
)
from megatron_gopd.verifiers.code_sandbox import ISOLATION_ENV, _remove_tree

REPO = Path(__file__).resolve().parents[1]
LIMITS = dict(wall_timeout_s=10.0, cpu_time_s=5, memory_bytes=512 * 1024**2, max_processes=8)


def _fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def _env(**extra: str) -> dict[str, str]:
    """Environment of a helper process: the worktree's package first, nothing else of ours."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), "HOME": "/tmp"}
    env.update(extra)
    return env


# ----------------------------------------------------------------------------------------------
# Isolation from the caller (run by an ordinary user and by root)

# Runs in a helper process (the "caller"): it owns a checkpoint and metrics.jsonl, holds a secret
# in its environment, listens on loopback, then lets a candidate attack all of that.
CALLER = textwrap.dedent(
    """
    import json, os, socket, sys, tempfile
    from megatron_gopd.verifiers import SandboxConfig, run_python

    out = tempfile.mkdtemp(prefix="gopd-caller-")
    files = {name: os.path.join(out, name) for name in ("checkpoint.pt", "metrics.jsonl")}
    for path in files.values():
        open(path, "w").write("precious")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    attack = '''
    import ctypes, glob, os, signal, socket
    leaked = []
    for path in glob.glob("/proc/*/environ") + ["/proc/%(pid)d/environ", "/proc/%(ppid)d/environ"]:
        try:
            if b"GOPD_TEST_SECRET" in open(path, "rb").read():
                leaked.append(path)
        except OSError:
            pass
    print("leaked", leaked, flush=True)
    for pid in (%(pid)d, %(ppid)d, -1):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError as exc:
            print("kill", pid, type(exc).__name__, flush=True)
    for path in %(files)r:
        for attempt in (os.remove, lambda p: open(p, "w").close()):
            try:
                attempt(path)
                print("changed", path, flush=True)
            except OSError as exc:
                print("kept", path, type(exc).__name__, flush=True)
    try:
        socket.create_connection(("127.0.0.1", %(port)d), timeout=2)
        print("connected", flush=True)
    except OSError as exc:
        print("no connection", type(exc).__name__, flush=True)
    print("userns", ctypes.CDLL(None).unshare(0x10000000), flush=True)
    ''' % dict(
        pid=os.getpid(), ppid=os.getppid(), files=list(files.values()),
        port=listener.getsockname()[1],
    )
    run = run_python(attack, config=SandboxConfig(wall_timeout_s=20))
    try:
        listener.accept()
        accepted = True
    except BlockingIOError:
        accepted = False
    print(json.dumps({
        "stdout": run.stdout, "stderr": run.stderr[-2000:], "succeeded": run.succeeded,
        "files": {name: open(path).read() for name, path in files.items()},
        "accepted": accepted, "uid": os.getuid(),
    }))
    """
)


def _ordinary_user_prefix() -> list[str]:
    if os.geteuid() != 0:
        return []  # we are one already
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot switch to an ordinary user")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


@pytest.mark.slow
@pytest.mark.parametrize("caller", ["ordinary_user", "current_uid"])
def test_candidate_cannot_reach_its_caller(caller):
    prefix = _ordinary_user_prefix() if caller == "ordinary_user" else []
    secret = "s3cr3t-" + os.urandom(8).hex()
    done = subprocess.run(
        [*prefix, sys.executable, "-c", CALLER],
        env=_env(GOPD_TEST_SECRET=secret),
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
    )
    # The caller survived (kill attempts on its pid, its parent's and -1) and could report.
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if caller == "ordinary_user":
        assert report["uid"] == 65534 or os.geteuid() != 0
    stdout = report["stdout"]
    assert report["succeeded"], report
    assert "leaked []" in stdout and secret not in stdout  # no environ of the caller visible
    assert "changed" not in stdout and report["files"] == {"checkpoint.pt": "precious", "metrics.jsonl": "precious"}
    assert "no connection" in stdout and not report["accepted"]  # loopback of the host unreachable
    assert "userns -1" in stdout  # no nested user namespaces for the candidate


def test_leftovers_in_tmp_and_shm_do_not_persist():
    name = "gopd-leftover-" + os.urandom(6).hex()
    places = ["/tmp", "/var/tmp", "/dev/shm"]
    program = "\n".join(f"open('{place}/{name}', 'w').write('x' * 1000)" for place in places)
    run = run_python(program + "\nprint(open('/tmp/" + name + "').read()[:3])", config=SandboxConfig(**LIMITS))
    assert run.succeeded and run.stdout == "xxx\n", run
    assert [place for place in places if os.path.exists(f"{place}/{name}")] == []


def test_runs_in_several_threads_keep_their_own_files():
    """The verifiers score a batch in threads: one run must never close a file descriptor that by
    then belongs to another run (a double close once made concurrent runs fail with EBADF)."""
    from concurrent.futures import ThreadPoolExecutor

    def run(index: int):
        return run_python(f"print({index})", config=SandboxConfig(**LIMITS), prove_completion=True)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, range(32)))
    failed = [(i, r.describe()) for i, r in enumerate(results) if not r.succeeded]
    assert not failed and [r.stdout for r in results] == [f"{i}\n" for i in range(32)], failed


@pytest.mark.slow
def test_namespaces_unavailable_is_a_clear_error_unless_rlimits_is_chosen():
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs util-linux unshare to build a host without user namespaces")
    # A user namespace in which no further user namespace may be created stands in for a host
    # (or container) that forbids them.
    program = (
        "import sys\n"
        "from megatron_gopd.verifiers import SandboxConfig, SandboxUnavailableError, run_python\n"
        "try:\n"
        "    run = run_python('print(6 * 7)', config=SandboxConfig(drop_privileges=False))\n"
        "except SandboxUnavailableError as exc:\n"
        "    print('refused:', exc)\n"
        "else:\n"
        "    print('ran:', run.stdout.strip(), run.succeeded)\n"
    )
    script = f'echo 0 > /proc/sys/user/max_user_namespaces && exec {sys.executable} -c "$0"'
    outcomes = {}
    for isolation in ("namespaces", "rlimits"):
        done = subprocess.run(
            [unshare, "--user", "--map-root-user", "sh", "-c", script, program],
            env=_env(**{ISOLATION_ENV: isolation}),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0 and "unshare failed" in done.stderr:
            pytest.skip(f"user namespaces unavailable to the test itself: {done.stderr.strip()}")
        outcomes[isolation] = done.stdout.strip()
    refused = outcomes["namespaces"]
    assert refused.startswith("refused:") and "namespaces" in refused, outcomes
    assert f"{ISOLATION_ENV}=rlimits" in refused
    assert outcomes["rlimits"] == "ran: 42 True"


def test_unusable_interpreter_is_refused_up_front():
    config = SandboxConfig(**LIMITS, python_executable="/nonexistent/python3")
    with pytest.raises(SandboxUnavailableError, match="/nonexistent/python3"):
        check_sandbox(config)


def test_isolation_is_validated_and_read_from_the_environment(monkeypatch):
    with pytest.raises(ValueError, match=ISOLATION_ENV):
        SandboxConfig(isolation="chroot")
    monkeypatch.setenv(ISOLATION_ENV, "rlimits")
    assert SandboxConfig().isolation == "rlimits"
    monkeypatch.delenv(ISOLATION_ENV)
    assert SandboxConfig().isolation == "namespaces"


# ----------------------------------------------------------------------------------------------
# Verdicts need evidence that the tests ran


@pytest.mark.parametrize(
    "ending",
    ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit", "import os; os.kill(os.getpid(), 9)"],
)
def test_exiting_before_the_asserts_does_not_pass(ending):
    verifier = CodeVerifier(SandboxConfig(**LIMITS))
    wrong = "def add(a, b):\n    return 0\n" + ending
    result = verifier({"tests": "assert add(1, 2) == 3"}, _fenced(wrong))
    assert result.reward == 0.0 and result.status in ("wrong", "error"), result
    exiting_in_the_middle = "import sys\ndef add(a, b):\n    return a + b\n"
    tests = "assert add(1, 2) == 3\nsys.exit(0)\nassert add(2, 2) == 5"
    result = verifier({"tests": tests}, _fenced(exiting_in_the_middle))
    assert result.reward == 0.0 and result.status == "wrong", result


def test_completion_proof_is_not_part_of_the_output():
    run = run_python("print('hi')", config=SandboxConfig(**LIMITS), prove_completion=True)
    assert run.succeeded and run.completed and run.stdout == "hi\n"
    printed = run_python("print('a' * 32)", config=SandboxConfig(**LIMITS), prove_completion=True)
    assert printed.completed and printed.stdout == "a" * 32 + "\n"


# ----------------------------------------------------------------------------------------------
# Memory of the whole candidate


# Four children of 300 MB each: every one is under RLIMIT_AS, together they pass the total.
FORKED_CHILDREN = textwrap.dedent(
    """
    import os, time
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            data = b"x" * (300 * 1024**2)
            time.sleep(30)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    """
)
# SysV segments filled and detached: held by the IPC namespace, in no process's memory.
DETACHED_SYSV_SEGMENTS = textwrap.dedent(
    """
    import ctypes, time
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    for _ in range(8):
        segment = libc.shmget(0, 200 * 1024**2, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
        address = libc.shmat(segment, None, 0)
        ctypes.memset(address, 1, 200 * 1024**2)
        libc.shmdt(ctypes.c_void_p(address))
    time.sleep(30)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("program", [FORKED_CHILDREN, DETACHED_SYSV_SEGMENTS], ids=["forked", "sysv"])
def test_memory_is_capped_for_all_processes_together(program):
    config = SandboxConfig(**{**LIMITS, "wall_timeout_s": 30.0, "memory_total_bytes": 700 * 1024**2})
    start = time.monotonic()
    run = run_python(program, config=config)
    assert run.memory_exceeded and not run.succeeded and not run.timed_out, run
    assert "memory" in run.describe()
    assert time.monotonic() - start < 20


def test_memory_under_the_total_is_fine():
    one_child = FORKED_CHILDREN.replace("range(4)", "range(1)").replace("time.sleep(30)", "time.sleep(0.1)")
    config = SandboxConfig(**{**LIMITS, "memory_total_bytes": 700 * 1024**2})
    assert run_python(one_child, config=config).succeeded


# ----------------------------------------------------------------------------------------------
# Cleanup: no program can crash the caller

DEEP_TREE = textwrap.dedent(
    """
    import os
    for level in range(3000):
        os.mkdir("d")
        os.chdir("d")
    open("leaf.txt", "w").write("x")
    os.chmod(".", 0o500)
    print("built")
    """
)


@pytest.mark.slow  # rmdir of 3,000 levels on disk ("rlimits") takes ~10 s on a slow disk
@pytest.mark.parametrize("isolation", ["namespaces", "rlimits"])
def test_deep_directory_tree_is_removed_without_crashing_the_caller(isolation):
    before = set(Path(tempfile.gettempdir()).glob("gopd-sandbox-*"))
    verifier = CodeVerifier(SandboxConfig(**LIMITS, isolation=isolation))
    result = verifier({"tests": "assert True"}, _fenced(DEEP_TREE))
    assert result.correct, result  # a scored result, not a RecursionError
    assert set(Path(tempfile.gettempdir()).glob("gopd-sandbox-*")) - before == set()


@pytest.mark.slow
def test_remove_tree_handles_depth_permissions_and_links(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    top = tmp_path / "tree"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    for level in range(3000):  # deeper than PATH_MAX allows to name: built relative to an fd
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.symlink(outside, "link", dir_fd=fd)
    os.close(fd)
    (top / "link_to_dir").symlink_to(tmp_path)
    locked = top / "d" / "d"
    os.chmod(locked, 0)
    _remove_tree(top)
    assert not top.exists() and outside.read_text() == "keep"
