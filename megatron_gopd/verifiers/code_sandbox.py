"""Run an untrusted Python program in a resource-limited subprocess (Linux).

`run_python(program, stdin, config)` writes the program to a fresh temporary directory, runs it in a
new session (its own process group) and returns its exit status and output. Every run:

- has a wall-clock limit (the whole process group is SIGKILLed when it passes) and rlimits on CPU
  time (``RLIMIT_CPU``), address space (``RLIMIT_AS``: a 10 GB allocation raises MemoryError), file
  size (``RLIMIT_FSIZE``: also caps stdout/stderr, which go to files, never to memory), processes
  (``RLIMIT_NPROC``), open files and core dumps;
- gets a clean environment built from scratch (PATH, LANG, HOME/TMPDIR = its directory, BLAS thread
  counts): nothing from the parent's environment, so no tokens or credentials leak;
- starts Python with ``-I`` (no PYTHON* variables, no user site-packages, no script directory on
  sys.path);
- leaves nothing behind: leftover processes are killed and the directory is removed.

Running as root (containers, this project's CI). Linux does not enforce ``RLIMIT_NPROC`` for real
uid 0, and root may raise its own hard limits again, so rlimits alone contain nothing. When the
parent is root (and `SandboxConfig.drop_privileges` is on, the default) each run therefore executes
as an unprivileged uid leased from the pool ``sandbox_uid_base .. +sandbox_uid_count`` (uids without
a passwd entry; one uid per concurrent run, leased with a lock file so that concurrent processes do
not share one). Because ``RLIMIT_NPROC`` counts *every* process of a user, a private uid makes the
limit a per-run limit, and after the run every process of that uid is killed, which also catches
children that left the process group with ``setsid()``. That uid must be able to run the
interpreter: when it cannot (a venv under ``/root``, mode 0700), ``python3`` from /usr/bin is used
instead, with a warning, and candidates then see only that interpreter's packages.

Running as an ordinary user, the run keeps the parent's uid: ``RLIMIT_NPROC`` is then set to the
number of tasks the user already has plus ``max_processes`` (the count is racy against the user's
other work), and only the process group is killed, so a candidate that calls ``setsid()`` escapes
the clean-up (bounded by the process limit).

Not isolated: there is NO NETWORK ISOLATION (that needs network namespaces, which this module does
not use): a candidate can open sockets and reach anything the host can. There is no filesystem
isolation beyond Unix permissions either: a candidate can read world-readable files and write to
world-writable places such as /tmp (each file capped by ``RLIMIT_FSIZE``). Memory is limited per
process, so the total is at most ``max_processes * memory_bytes``. Use containers or a VM for
adversarial code at scale.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

logger = logging.getLogger(__name__)

# Runs inside the sandboxed interpreter: set the limits, then run the program as __main__. Setting
# them here (rather than in a preexec_fn) keeps Popen safe in a multi-threaded parent.
_BOOTSTRAP = """
import resource, runpy, sys
def _cap(res, soft, hard):
    current_hard = resource.getrlimit(res)[1]
    if current_hard != resource.RLIM_INFINITY:
        hard = min(hard, current_hard)
    resource.setrlimit(res, (min(soft, hard), hard))
_cpu, _mem, _fsize, _nproc, _nofile = (int(a) for a in sys.argv[1:6])
_cap(resource.RLIMIT_CPU, _cpu, _cpu + 1)
_cap(resource.RLIMIT_AS, _mem, _mem)
_cap(resource.RLIMIT_FSIZE, _fsize, _fsize)
_cap(resource.RLIMIT_NPROC, _nproc, _nproc)
_cap(resource.RLIMIT_NOFILE, _nofile, _nofile)
_cap(resource.RLIMIT_CORE, 0, 0)
sys.argv = sys.argv[6:]
del _cap, _cpu, _mem, _fsize, _nproc, _nofile, resource
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_PROGRAM_FILE = "main.py"
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class SandboxConfig:
    """Limits of one sandboxed run. Validated on construction."""

    wall_timeout_s: float = 10.0
    """Wall-clock limit; past it the process group is killed and the run counts as timed out."""

    cpu_time_s: int = 10
    """RLIMIT_CPU in whole seconds, per process (SIGXCPU at the limit, SIGKILL one second later)."""

    memory_bytes: int = 2 * 1024**3
    """RLIMIT_AS per process (virtual memory; a Python interpreter alone needs ~30 MB)."""

    file_size_bytes: int = 16 * 1024**2
    """RLIMIT_FSIZE: largest file the program may write, including its stdout and stderr."""

    max_processes: int = 16
    """Processes/threads the program may create (RLIMIT_NPROC, see the module docstring)."""

    max_open_files: int = 256
    """RLIMIT_NOFILE."""

    python_executable: Optional[str] = None
    """Interpreter for candidates; None: ``sys.executable``, or ``/usr/bin/python3`` when running as
    root and the sandbox uid cannot run ``sys.executable``."""

    drop_privileges: bool = True
    """When the parent is root, run candidates as a leased unprivileged uid. Turning this off as
    root leaves no process limit at all (a fork bomb can exhaust the host's pids)."""

    sandbox_uid_base: int = 61000
    """First uid of the pool used when dropping privileges (uids with an account are skipped)."""

    sandbox_uid_count: int = 64
    """Size of that pool: the most concurrent runs on this host."""

    def __post_init__(self) -> None:
        if not self.wall_timeout_s > 0 or self.cpu_time_s < 1:
            raise ValueError(f"time limits must be positive: {self}")
        if min(self.memory_bytes, self.file_size_bytes, self.max_open_files) < 1:
            raise ValueError(f"memory, file-size and open-file limits must be positive: {self}")
        if self.max_processes < 1:
            raise ValueError(f"max_processes must be >= 1, got {self.max_processes}")
        if self.sandbox_uid_base < 1000 or self.sandbox_uid_count < 1:
            raise ValueError("sandbox uids must be >= 1000 (never root or a system account)")


@dataclass(frozen=True)
class ExecutionResult:
    """What a sandboxed run did.

    Attributes:
        returncode: exit code; negative when killed by a signal (``-9`` SIGKILL, ``-24`` SIGXCPU).
        stdout: standard output (UTF-8, undecodable bytes replaced), at most ``file_size_bytes``.
        stderr: standard error, same treatment.
        timed_out: the wall-clock or CPU-time limit was hit.
        wall_s: seconds from start to exit (or to the kill).
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float

    @property
    def succeeded(self) -> bool:
        """True when the program exited with code 0 within its limits."""
        return self.returncode == 0 and not self.timed_out

    def describe(self) -> str:
        """One line for logs: how the run ended, with the last line of stderr on failure."""
        if self.timed_out:
            return f"timed out after {self.wall_s:.1f}s"
        if self.returncode < 0:
            try:
                return f"killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"killed by signal {-self.returncode}"
        if self.returncode != 0:
            lines = self.stderr.strip().splitlines()
            return f"exit code {self.returncode}" + (f": {lines[-1][:200]}" if lines else "")
        return "exit code 0"


def run_python(
    program: str, stdin: str = "", config: Optional[SandboxConfig] = None
) -> ExecutionResult:
    """Run ``program`` (Python source) in the sandbox with ``stdin`` as its standard input.

    Never raises for anything the program does (crash, hang, fork bomb, memory or file-size bomb):
    those come back as a failed `ExecutionResult`. Raises RuntimeError only when the sandbox itself
    cannot be set up (no free sandbox uid, no interpreter the sandbox uid can run).
    """
    config = config or SandboxConfig()
    workdir = Path(tempfile.mkdtemp(prefix="gopd-sandbox-"))
    try:
        (workdir / _PROGRAM_FILE).write_text(program, encoding="utf-8")
        with _run_identity(config) as uid:
            if uid is not None:
                os.chown(workdir, uid, uid)
            return _execute(workdir, stdin, config, uid)
    finally:
        _remove_tree(workdir)


# ----------------------------------------------------------------------------------------------
# One run


def _execute(
    workdir: Path, stdin: str, config: SandboxConfig, uid: Optional[int]
) -> ExecutionResult:
    """Start the candidate in ``workdir``, wait within the limits, clean up, collect output."""
    # Output goes to unlinked files, never into our memory, and RLIMIT_FSIZE caps them.
    with contextlib.ExitStack() as files:
        fin, fout, ferr = (files.enter_context(tempfile.TemporaryFile()) for _ in range(3))
        fin.write(stdin.encode("utf-8"))
        fin.seek(0)
        start = time.monotonic()
        proc = subprocess.Popen(
            _command(config, uid),
            cwd=workdir,
            env=_clean_env(workdir),
            stdin=fin,
            stdout=fout,
            stderr=ferr,
            close_fds=True,
            start_new_session=True,  # its own process group, so we can kill all of it
            **_identity_kwargs(uid),
        )
        exited = _wait_without_reaping(proc.pid, config.wall_timeout_s)
        wall_s = time.monotonic() - start
        # Kill the group while the (possibly exited, still unreaped) leader pins its id, so the
        # id cannot have been reused; this also ends children left running in the background.
        _kill_process_group(proc.pid)
        returncode = proc.wait()
        if uid is not None:
            _kill_user_processes(uid)  # children that escaped the group with setsid()
        return ExecutionResult(
            returncode=returncode,
            stdout=_read_capped(fout, config.file_size_bytes),
            stderr=_read_capped(ferr, config.file_size_bytes),
            timed_out=not exited or returncode == -signal.SIGXCPU,
            wall_s=wall_s,
        )


def _command(config: SandboxConfig, uid: Optional[int]) -> list[str]:
    """The interpreter, the rlimit bootstrap and its arguments (see `_BOOTSTRAP`)."""
    if uid is not None:
        nproc = config.max_processes  # a private uid: the count starts at this process
    else:  # our own uid: the limit is on the total of our tasks, so add what already runs
        nproc = _user_tasks(os.getuid()) + config.max_processes
    limits = (config.cpu_time_s, config.memory_bytes, config.file_size_bytes, nproc)
    return [
        _interpreter(config, uid), "-I", "-c", _BOOTSTRAP,
        *map(str, limits), str(config.max_open_files), _PROGRAM_FILE,
    ]  # fmt: skip


def _clean_env(workdir: Path) -> dict[str, str]:
    """The candidate's whole environment: built from scratch, nothing inherited."""
    home = str(workdir)
    return {
        "PATH": _SAFE_PATH,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": home,
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


def _remove_tree(path: Path) -> None:
    def make_writable_and_retry(func: Callable[[str], Any], failed_path: str, _exc: Any) -> None:
        # A candidate running as our own uid may have chmod-ed its files read-only.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed_path), stat.S_IRWXU)
            os.chmod(failed_path, stat.S_IRWXU)
        with contextlib.suppress(OSError):
            func(failed_path)

    shutil.rmtree(path, onerror=make_writable_and_retry)
    if path.exists():
        logger.warning("could not remove sandbox directory %s", path)


# ----------------------------------------------------------------------------------------------
# Who runs the candidate


@contextlib.contextmanager
def _run_identity(config: SandboxConfig) -> Iterator[Optional[int]]:
    """Yield the uid to run as: a leased unprivileged uid when root, else None (keep ours)."""
    if os.geteuid() != 0:
        yield None
        return
    if not config.drop_privileges:
        _warn_once("sandboxed code runs as root: RLIMIT_NPROC is ignored, limits can be raised")
        yield None
        return
    with _lease_uid(config) as uid:
        yield uid


@contextlib.contextmanager
def _lease_uid(config: SandboxConfig) -> Iterator[int]:
    """Lease a free uid from the pool, exclusive across threads and processes (flock)."""
    lock_dir = _lock_dir()
    offset = (os.getpid() * 7 + threading.get_ident()) % config.sandbox_uid_count
    for k in range(config.sandbox_uid_count):
        uid = config.sandbox_uid_base + (offset + k) % config.sandbox_uid_count
        if _uid_has_account(uid):
            continue
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(lock_dir / f"{uid}.lock", flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            _kill_user_processes(uid)  # leftovers of a run whose parent crashed
            if _user_processes(uid):  # unreaped zombies still count against RLIMIT_NPROC
                continue
            yield uid
            return
        finally:
            os.close(fd)  # releases the lock
    raise RuntimeError(
        f"no free sandbox uid in {config.sandbox_uid_base}..+{config.sandbox_uid_count} "
        "(too many concurrent runs, or leftover processes); raise SandboxConfig.sandbox_uid_count"
    )


def _lock_dir() -> Path:
    """A root-only directory for the uid lock files; refuses one a sandboxed user could control."""
    path = Path(tempfile.gettempdir()) / "gopd-sandbox-uids"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise RuntimeError(f"{path} must be a directory owned by uid {os.geteuid()} with mode 0700")
    return path


@functools.lru_cache(maxsize=None)
def _uid_has_account(uid: int) -> bool:
    # Never borrow a real account's uid: we kill every process of the uid we use.
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _interpreter(config: SandboxConfig, uid: Optional[int]) -> str:
    """The Python executable candidates run with (see `SandboxConfig.python_executable`)."""
    if uid is None:
        return config.python_executable or sys.executable
    with _interpreter_lock:
        key = config.python_executable
        if key not in _interpreter_cache:
            _interpreter_cache[key] = _interpreter_for_unprivileged(key, uid)
        return _interpreter_cache[key]


# Every pool uid has the same (world) permissions, so one probe per requested interpreter suffices.
_interpreter_cache: dict[Optional[str], str] = {}
_interpreter_lock = threading.Lock()


def _interpreter_for_unprivileged(requested: Optional[str], uid: int) -> str:
    """The requested interpreter, or the first of sys.executable / python3 that ``uid`` can run."""
    if requested is not None:
        if not _can_run(requested, uid):
            raise RuntimeError(f"the sandbox uid cannot run python_executable={requested!r}")
        return requested
    for exe in filter(None, [sys.executable, shutil.which("python3", path=_SAFE_PATH)]):
        if _can_run(exe, uid):
            if exe != sys.executable:
                logger.warning(
                    "sandbox uid cannot run %s (private directory); candidates run with %s",
                    sys.executable, exe,
                )  # fmt: skip
            return exe
    raise RuntimeError(
        "no Python interpreter the unprivileged sandbox uid can run; set "
        "SandboxConfig.python_executable to one outside private directories"
    )


def _can_run(exe: str, uid: int) -> bool:
    try:
        result = subprocess.run(
            [exe, "-I", "-c", "pass"], cwd="/", env=_clean_env(Path("/")), timeout=60,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            **_identity_kwargs(uid),
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


# ----------------------------------------------------------------------------------------------
# Processes of a uid (from /proc)


def _user_processes(uid: int) -> list[tuple[int, str, int]]:
    """(pid, state letter, thread count) of every process whose real uid is ``uid``."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/status", encoding="utf-8") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:  # exited while we looked
                continue
            if int(fields.get("Uid", "-1 0").split()[0]) == uid:
                state = fields.get("State", "?").strip()[:1]
                found.append((int(entry.name), state, int(fields.get("Threads", "1").strip())))
    return found


def _user_tasks(uid: int) -> int:
    """Tasks (threads) of ``uid``: what RLIMIT_NPROC compares against."""
    return sum(threads for _, state, threads in _user_processes(uid) if state != "Z")


def _kill_user_processes(uid: int, rounds: int = 200) -> None:
    """SIGKILL every live process of ``uid`` (never ours: the uid comes from the sandbox pool)."""
    assert uid not in (0, os.getuid(), os.geteuid()), "refusing to kill our own uid's processes"
    for _ in range(rounds):
        live = [pid for pid, state, _ in _user_processes(uid) if state not in ("Z", "X")]
        if not live:
            return
        for pid in live:  # rescanning catches children forked while we killed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
    logger.warning("processes of sandbox uid %d survived %d kill rounds", uid, rounds)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


__all__ = ["ExecutionResult", "SandboxConfig", "run_python"]
