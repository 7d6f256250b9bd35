"""Run an untrusted Python program in an isolated, resource-limited sandbox (Linux).

`run_python(program, stdin, config)` runs ``program`` with ``stdin`` and returns how it ended and its
output. It never raises for anything the program does: every failure comes back as a failed
`ExecutionResult`. How the program is contained depends on `SandboxConfig.isolation`.

``isolation="namespaces"`` (the default). The program runs in new user, pid, mount, network, IPC,
UTS and cgroup namespaces, whatever the caller's uid (no root, no setuid helper, no package to
install: only Linux's unprivileged user namespaces). Inside:

- Filesystem: a private root with read-only binds of /usr, /bin, /sbin, /lib*, /etc and the
  interpreter's installation (e.g. the venv), and nothing else of the host: no /home, no caller
  files (datasets, checkpoints, metrics), no host /tmp. The working directory /sandbox, /tmp,
  /var/tmp and /dev/shm share one tmpfs of ``tmpfs_bytes`` that disappears with the run, so
  nothing the program writes survives it; /proc shows only the sandbox's own processes.
- Processes: a pid namespace; the program cannot see or signal the verifier or any other process
  of the host (so it cannot read ``/proc/<pid>/environ`` of its parent), and when the run ends the
  kernel kills every process left in it, including ones that called ``setsid()``.
- Network: an empty network namespace (only a loopback interface, down): no connection to
  anything, the host's loopback services included; ``socket()`` itself still succeeds.
- Privileges: the program runs as uid 1000 of its user namespace (mapped to the caller's uid) with
  no capabilities and ``no_new_privs``; a root caller first switches to an unprivileged uid leased
  from ``sandbox_uid_base..+sandbox_uid_count`` (uids without an account), so the program never has
  root's file access either.
- Memory: ``RLIMIT_AS`` per process, and ``memory_total_bytes`` for all of its processes together,
  enforced by the sandbox's pid 1, which sums their resident anonymous and shared memory and the
  SysV segments of its IPC namespace every ``memory_poll_s`` and kills the whole sandbox past the
  limit (a process can overshoot by what it allocates in one interval, never past its own
  ``RLIMIT_AS``). Not counted: the tmpfs, and memory held only through file descriptors
  (``memfd_create``: at most ``max_open_files * file_size_bytes`` per process). No cgroups: they
  are rarely delegated to users on clusters.

When namespaces are unavailable (``kernel.unprivileged_userns_clone=0``, AppArmor's
``kernel.apparmor_restrict_unprivileged_userns``, ``user.max_user_namespaces=0``, a container's
seccomp profile), the first run raises `SandboxUnavailableError` naming the reason, instead of
running model-written code unconfined.

``isolation="rlimits"`` (opt-in: ``SandboxConfig(isolation="rlimits")`` or the environment variable
``GOPD_SANDBOX_ISOLATION=rlimits``). The old, weaker mode: the limits below but no namespaces. The
program can then read whatever the caller's uid can read, write to world-writable places such as
/tmp (files it leaves there persist), connect to the network, and, run by an ordinary user,
signal or ptrace the caller's other processes and change its files. Use it only where the models
are trusted or the whole job runs in a disposable container.

In both modes every run has a wall-clock limit (the launcher's process group is SIGKILLed past it),
``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE`` (also caps stdout/stderr, which go to files, never
to memory), ``RLIMIT_NPROC``, ``RLIMIT_NOFILE`` and no core dumps; a clean environment built from
scratch (nothing of the caller's: no tokens); ``python -I``. ``RLIMIT_NPROC`` counts per user
namespace on Linux >= 5.14, so with namespaces it is a per-run limit; on older kernels, and in
``rlimits`` mode as an ordinary user, it counts all tasks of the uid, so the limit is set to the
user's current count plus ``max_processes`` (racy against the user's other work).

Not contained in either mode: CPU time across processes beyond ``RLIMIT_CPU`` each, disk bandwidth,
and kernel bugs (there is no seccomp filter). For hostile code at scale use a VM.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Optional

from megatron_gopd.verifiers.sandbox_cleanup import _remove_tree
from megatron_gopd.verifiers.sandbox_identity import _kill_user_processes, _run_identity, _user_tasks

logger = logging.getLogger(__name__)

ISOLATION_ENV = "GOPD_SANDBOX_ISOLATION"
"""Environment variable that sets the default `SandboxConfig.isolation`."""

ISOLATIONS = ("namespaces", "rlimits")
_PROGRAM_FILE = "main.py"
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_SANDBOX_DIR = "/sandbox"  # the working directory inside the namespaces
# Read-only inside the namespaces, besides the interpreter's own directories.
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_LAUNCHER_SOURCE = (Path(__file__).parent / "_sandbox_init.py").read_text(encoding="utf-8")


def _default_isolation() -> str:
    return os.environ.get(ISOLATION_ENV, "namespaces")


class SandboxUnavailableError(RuntimeError):
    """The sandbox cannot run here (no namespaces, no usable interpreter): nothing was scored."""


@dataclass
class SandboxConfig:
    """Limits and isolation of one sandboxed run. Validated on construction."""

    wall_timeout_s: float = 10.0
    """Wall-clock limit; past it the run is killed and counts as timed out."""

    cpu_time_s: int = 10
    """RLIMIT_CPU in whole seconds, per process (SIGXCPU at the limit, SIGKILL one second later)."""

    memory_bytes: int = 2 * 1024**3
    """RLIMIT_AS per process (virtual memory; a Python interpreter alone needs ~30 MB)."""

    memory_total_bytes: int = 4 * 1024**3
    """Resident memory of all the program's processes together ("namespaces" isolation only; in
    "rlimits" mode the total is bounded only by ``max_processes * memory_bytes``)."""

    memory_poll_s: float = 0.02
    """How often the sandbox's pid 1 sums its processes' memory against ``memory_total_bytes``."""

    tmpfs_bytes: int = 256 * 1024**2
    """Size of the tmpfs holding /sandbox, /tmp, /var/tmp and /dev/shm ("namespaces" only); it is
    memory, on top of ``memory_total_bytes``."""

    tmpfs_inodes: int = 16384
    """Files and directories the program may create in that tmpfs."""

    file_size_bytes: int = 16 * 1024**2
    """RLIMIT_FSIZE: largest file the program may write, including its stdout and stderr."""

    max_processes: int = 16
    """Processes/threads the program may create (RLIMIT_NPROC, see the module docstring)."""

    max_open_files: int = 256
    """RLIMIT_NOFILE."""

    isolation: str = field(default_factory=_default_isolation)
    """"namespaces" (default) or "rlimits" (weaker, opt-in; see the module docstring). The default
    comes from the environment variable ``GOPD_SANDBOX_ISOLATION`` when it is set."""

    python_executable: Optional[str] = None
    """Interpreter for candidates; None: the first of ``sys.executable`` and ``python3`` on the
    system PATH that works in the sandbox (a venv under a private home directory does not)."""

    drop_privileges: bool = True
    """When the caller is root, run candidates as a leased unprivileged uid. Turning this off as
    root gives them root's access to every file the sandbox shows, and in "rlimits" mode no
    process limit at all."""

    sandbox_uid_base: int = 61000
    """First uid of the pool used when dropping privileges (uids with an account are skipped)."""

    sandbox_uid_count: int = 64
    """Size of that pool: the most concurrent runs on this host."""

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATIONS:
            raise ValueError(
                f"SandboxConfig.isolation (or ${ISOLATION_ENV}) must be one of {ISOLATIONS}, got {self.isolation!r}"
            )
        if not self.wall_timeout_s > 0 or self.cpu_time_s < 1 or not self.memory_poll_s > 0:
            raise ValueError(f"time limits must be positive: {self}")
        sizes = (self.memory_bytes, self.memory_total_bytes, self.tmpfs_bytes, self.tmpfs_inodes,
                 self.file_size_bytes, self.max_open_files)  # fmt: skip
        if min(sizes) < 1:
            raise ValueError(f"memory, tmpfs, file-size and open-file limits must be positive: {self}")
        if self.max_processes < 1:
            raise ValueError(f"max_processes must be >= 1, got {self.max_processes}")
        if self.sandbox_uid_base < 1000 or self.sandbox_uid_count < 1:
            raise ValueError("sandbox uids must be >= 1000 (never root or a system account)")


@dataclass(frozen=True)
class ExecutionResult:
    """What a sandboxed run did.

    Attributes:
        returncode: exit code; negative when killed by a signal (``-9`` SIGKILL, ``-24`` SIGXCPU).
        stdout: standard output (UTF-8, undecodable bytes replaced), at most ``file_size_bytes``,
            without the completion proof.
        stderr: standard error, same treatment.
        timed_out: the wall-clock or CPU-time limit was hit.
        wall_s: seconds from start to exit (or to the kill).
        memory_exceeded: the program's processes together passed ``memory_total_bytes``.
        completed: for ``run_python(..., prove_completion=True)``: whether the program ran to its
            last line (the sandbox's proof was found); None when not asked for.
        sandbox_error: the sandbox itself failed to start this run (the program never ran).
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float
    memory_exceeded: bool = False
    completed: Optional[bool] = None
    sandbox_error: Optional[str] = None

    @property
    def succeeded(self) -> bool:
        """True when the program exited with code 0 within its limits (and ran to completion)."""
        return (
            self.returncode == 0
            and not self.timed_out
            and not self.memory_exceeded
            and self.sandbox_error is None
            and self.completed is not False
        )

    def describe(self) -> str:
        """One line for logs: how the run ended, with the last line of stderr on failure."""
        if self.sandbox_error is not None:
            return f"sandbox failed: {self.sandbox_error}"
        if self.timed_out:
            return f"timed out after {self.wall_s:.1f}s"
        if self.memory_exceeded:
            return "killed: its processes together exceeded the sandbox's memory limit"
        if self.returncode < 0:
            try:
                return f"killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"killed by signal {-self.returncode}"
        if self.returncode != 0:
            lines = self.stderr.strip().splitlines()
            return f"exit code {self.returncode}" + (f": {lines[-1][:200]}" if lines else "")
        if self.completed is False:
            return "exit code 0, but the program ended before its last line (the tests did not all run)"
        return "exit code 0"


def run_python(
    program: str,
    stdin: str = "",
    config: Optional[SandboxConfig] = None,
    *,
    prove_completion: bool = False,
) -> ExecutionResult:
    """Run ``program`` (Python source) in the sandbox with ``stdin`` as its standard input.

    Never raises for anything the program does (crash, hang, early exit, fork bomb, memory, file
    or directory bombs): those come back as a failed `ExecutionResult`.

    Args:
        prove_completion: append a last line that copies a random nonce from a pipe the program
            was not told about to stdout, and report in ``completed`` whether it arrived. A program
            that ends early (``sys.exit(0)``, ``os._exit(0)``, a signal) fails instead of passing.
            Finding and replaying the nonce on purpose is not prevented: it is in the program's
            reach (an open file descriptor), only not in its text.

    Raises:
        SandboxUnavailableError: on the first run, when the sandbox cannot work on this host
            (no namespaces, no interpreter the sandbox can run); the message says why.
    """
    config = config or SandboxConfig()
    interpreter = _checked_interpreter(config)
    return _run(program, stdin, config, interpreter, prove_completion)


def check_sandbox(config: Optional[SandboxConfig] = None) -> str:
    """Verify once per process that the sandbox works here; return the interpreter it uses.

    Call it at start-up to fail before any work when code samples will be scored.

    Raises:
        SandboxUnavailableError: naming the reason (and the opt-in to the weaker mode).
    """
    return _checked_interpreter(config or SandboxConfig())


# ----------------------------------------------------------------------------------------------
# One run


def _run(program: str, stdin: str, config: SandboxConfig, interpreter: str, prove_completion: bool) -> ExecutionResult:
    """One run in a fresh directory, removed afterwards whatever the program left in it."""
    tmp = Path(tempfile.mkdtemp(prefix="gopd-sandbox-"))
    try:
        with _run_identity(config) as uid:
            return _execute(tmp, program, stdin, config, interpreter, uid, prove_completion)
    except OSError as exc:  # fork/pipe failures of ours: the program did not run
        logger.warning("sandbox run failed: %s", exc)
        return ExecutionResult(-1, "", "", False, 0.0, sandbox_error=str(exc))
    finally:
        _remove_tree(tmp)


def _execute(
    tmp: Path,
    program: str,
    stdin: str,
    config: SandboxConfig,
    interpreter: str,
    uid: Optional[int],
    prove_completion: bool,
) -> ExecutionResult:
    """Start the launcher, wait within the limits, kill what is left, collect the verdict."""
    namespaces = config.isolation == "namespaces"
    workdir, root = tmp / "work", tmp / "root"
    workdir.mkdir()
    root.mkdir()
    with contextlib.ExitStack() as stack:
        report_r, report_w = os.pipe()
        stack.callback(os.close, report_r)
        # Our copy of the write end is closed once the launcher holds its own (so that reading
        # the report ends when the sandbox does), or at exit if Popen failed; never twice: with
        # runs in several threads the number may already belong to another run's file.
        write_end = _FdOnce(report_w)
        stack.callback(write_end.close)
        pass_fds = [report_w]
        nonce = None
        if prove_completion:
            nonce = secrets.token_hex(16)
            nonce_fd = _pipe_holding(nonce.encode())
            stack.callback(os.close, nonce_fd)
            pass_fds.append(nonce_fd)
            program += _completion_epilogue(nonce_fd)
        (workdir / _PROGRAM_FILE).write_text(program, encoding="utf-8")
        if uid is not None:
            for path in (tmp, workdir, root, workdir / _PROGRAM_FILE):
                os.chown(path, uid, uid)
        env = _clean_env(_SANDBOX_DIR if namespaces else str(workdir), namespaces)
        spec = {
            "namespaces": namespaces,
            "interpreter": interpreter,
            "limits": _limits(config, uid, namespaces),
            "report_fd": report_w,
            "parent_pid": os.getpid(),
            "env": env,
            "root_dir": str(root),
            "program_source": str(workdir / _PROGRAM_FILE),
            "readonly_paths": _readonly_paths(interpreter),
            "tmpfs_bytes": config.tmpfs_bytes,
            "tmpfs_inodes": config.tmpfs_inodes,
            "memory_total_bytes": config.memory_total_bytes,
            "memory_poll_s": config.memory_poll_s,
        }
        # Output goes to unlinked files, never into our memory, and RLIMIT_FSIZE caps them.
        fin, fout, ferr = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(3))
        fin.write(stdin.encode("utf-8"))
        fin.seek(0)
        start = time.monotonic()
        proc = subprocess.Popen(
            [interpreter, "-I", "-c", _LAUNCHER_SOURCE, json.dumps(spec)],
            cwd=workdir,
            env=env if not namespaces else _clean_env(str(tmp), False),
            stdin=fin,
            stdout=fout,
            stderr=ferr,
            close_fds=True,
            pass_fds=pass_fds,
            start_new_session=True,  # its own process group, so we can kill all of it
            **_identity_kwargs(uid),
        )
        write_end.close()
        exited = _wait_without_reaping(proc.pid, config.wall_timeout_s)
        wall_s = time.monotonic() - start
        # Kill the group while the (possibly exited, still unreaped) leader pins its id, so the
        # id cannot have been reused; this also ends children left running in the background
        # (with namespaces, killing the sandbox's pid 1 ends everything inside).
        _kill_process_group(proc.pid)
        launcher_code = proc.wait()
        if uid is not None:
            _kill_user_processes(uid)  # children that escaped the group with setsid()
        report = _read_report(report_r)
        stdout = _read_capped(fout, config.file_size_bytes)
        completed = None
        if nonce is not None:
            proof = f"\n{nonce}\n"
            completed = proof in stdout
            stdout = stdout.replace(proof, "", 1)
        if namespaces:
            if "status" in report:
                returncode = os.waitstatus_to_exitcode(report["status"])
            else:  # killed before pid 1 could report: the wall clock, or a sandbox failure
                returncode = -signal.SIGKILL
                if exited and "error" not in report:
                    report["error"] = f"the sandbox launcher ended (code {launcher_code}) without a verdict"
        else:
            returncode = launcher_code
        return ExecutionResult(
            returncode=returncode,
            stdout=stdout,
            stderr=_read_capped(ferr, config.file_size_bytes),
            timed_out=not exited or returncode == -signal.SIGXCPU,
            wall_s=wall_s,
            memory_exceeded=bool(report.get("memory_exceeded")),
            completed=completed,
            sandbox_error=report.get("error") if exited else None,
        )


def _completion_epilogue(nonce_fd: int) -> str:
    """The program's last lines: copy the nonce from ``nonce_fd`` to stdout (raw, unbuffered)."""
    return f"\n\nimport os as _gopd_os\n_gopd_os.write(1, b'\\n' + _gopd_os.read({nonce_fd}, 64) + b'\\n')\n"


def _pipe_holding(data: bytes) -> int:
    """The read end of a pipe that holds ``data`` and whose write end is closed."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
    finally:
        os.close(write_end)
    return read_end


class _FdOnce:
    """A file descriptor that `close` closes at most once (later calls do nothing)."""

    def __init__(self, fd: int) -> None:
        self._fd: Optional[int] = fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _read_report(fd: int) -> dict[str, Any]:
    """The JSON lines the launcher wrote, merged (everything that could write has exited)."""
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    merged: dict[str, Any] = {}
    for line in data.splitlines():
        with contextlib.suppress(ValueError):
            merged.update(json.loads(line))
    return merged


def _limits(config: SandboxConfig, uid: Optional[int], namespaces: bool) -> dict[str, int]:
    """The rlimits of the candidate process (see the module docstring for RLIMIT_NPROC)."""
    # With namespaces the launcher and the sandbox's pid 1 count against the limit too.
    nproc = config.max_processes + (2 if namespaces else 0)
    private_count = uid is not None or (namespaces and _nproc_counted_per_namespace())
    if not private_count:  # the limit is on the total of our uid's tasks: add what already runs
        nproc += _user_tasks(os.getuid())
    return {
        "RLIMIT_CPU": config.cpu_time_s,
        "RLIMIT_AS": config.memory_bytes,
        "RLIMIT_FSIZE": config.file_size_bytes,
        "RLIMIT_NPROC": nproc,
        "RLIMIT_NOFILE": config.max_open_files,
        "RLIMIT_CORE": 0,
    }


@functools.lru_cache(maxsize=None)
def _nproc_counted_per_namespace() -> bool:
    """Linux >= 5.14 counts RLIMIT_NPROC per user namespace (ucounts)."""
    try:
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 14)


def _readonly_paths(interpreter: str) -> list[str]:
    """Host directories the candidate sees read-only: the system's and the interpreter's."""
    wanted = list(_SYSTEM_PATHS)
    for exe in (os.path.abspath(interpreter), os.path.realpath(interpreter)):
        wanted.append(os.path.dirname(os.path.dirname(exe)))  # a venv, or an installation prefix
    if interpreter == sys.executable:
        wanted += [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    paths: list[str] = []
    for path in wanted:
        path = os.path.normpath(path)
        inside = any(path == p or path.startswith(p.rstrip("/") + "/") for p in paths)
        if path != "/" and not inside:  # never the whole host
            paths.append(path)
    return paths


def _clean_env(home: str, namespaces: bool) -> dict[str, str]:
    """The candidate's whole environment: built from scratch, nothing inherited."""
    return {
        "PATH": _SAFE_PATH,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": "/tmp" if namespaces else home,
        # RLIMIT_NPROC counts threads: keep numerical libraries from starting one per core.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _identity_kwargs(uid: Optional[int]) -> dict[str, Any]:
    if uid is None:
        return {}
    # Popen switches uid/gid and clears supplementary groups between fork and exec (in C, so it is
    # safe with threads), before any candidate code runs.
    return {"user": uid, "group": uid, "extra_groups": []}


def _read_capped(stream: IO[bytes], limit: int) -> str:
    stream.seek(0)
    return stream.read(limit).decode("utf-8", errors="replace")


def _wait_without_reaping(pid: int, timeout_s: float) -> bool:
    """Wait until process ``pid`` exits or ``timeout_s`` passes; True if it exited.

    Does not reap it, so its pid (= the process-group id) stays reserved for `_kill_process_group`.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # Linux < 5.3: poll instead
        deadline = time.monotonic() + timeout_s
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout_s * 1000))))
    finally:
        os.close(pidfd)


def _kill_process_group(pgid: int) -> None:
    # One killpg reaches every member: Linux makes a group-wide signal atomic with respect to fork
    # (a child being forked during the kill gets it too), so the group cannot outgrow the kill.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# ----------------------------------------------------------------------------------------------
# The interpreter, checked once per process


_checked: dict[tuple[str, Optional[str]], str] = {}
_checked_lock = threading.Lock()


def _checked_interpreter(config: SandboxConfig) -> str:
    """The interpreter that runs a trivial program in this sandbox; probed once, then cached."""
    key = (config.isolation, config.python_executable)
    with _checked_lock:
        if key not in _checked:
            _checked[key] = _probe_interpreter(config)
        return _checked[key]


def _probe_interpreter(config: SandboxConfig) -> str:
    if config.python_executable is not None:
        candidates = [config.python_executable]
    else:
        candidates = [sys.executable, shutil.which("python3", path=_SAFE_PATH)]
    failures = []
    for exe in dict.fromkeys(filter(None, candidates)):
        run = _run("print('ok')", "", config, exe, prove_completion=False)
        if run.succeeded and run.stdout == "ok\n":
            if exe != candidates[0]:
                logger.warning("the sandbox cannot run %s; candidates run with %s", candidates[0], exe)
            return exe
        failures.append(f"{exe}: {run.describe()}")
    reasons = "; ".join(failures)
    if config.isolation == "namespaces":
        raise SandboxUnavailableError(
            f"code sandbox unavailable: {reasons}. It needs unprivileged user namespaces (user, "
            "pid, mount, network), which this host or container does not allow (check sysctl "
            "kernel.unprivileged_userns_clone, user.max_user_namespaces, "
            "kernel.apparmor_restrict_unprivileged_userns, or the container's seccomp profile). "
            f"To run candidates without isolation instead, set {ISOLATION_ENV}=rlimits "
            "(SandboxConfig.isolation='rlimits') - only for trusted models or a disposable container"
        )
    raise SandboxUnavailableError(
        f"code sandbox unavailable: no interpreter works in it ({reasons}); "
        "set SandboxConfig.python_executable to one outside private directories"
    )


__all__ = [
    "ISOLATION_ENV",
    "ExecutionResult",
    "SandboxConfig",
    "SandboxUnavailableError",
    "check_sandbox",
    "run_python",
]
