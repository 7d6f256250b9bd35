"""Who runs a sandboxed candidate: an unprivileged uid leased for the run when the caller is root,
and the processes of such a uid (read from /proc), killed when a run is over."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import pwd
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:
    from megatron_gopd.verifiers.code_sandbox import SandboxConfig

logger = logging.getLogger(__name__)
_warned: set[str] = set()


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
