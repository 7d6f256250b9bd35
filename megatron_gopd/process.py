"""Process lifetime: one job per output directory, signals that reach the workers, no orphans.

* `OutputDirLock`: an exclusive ``flock`` on ``<output_dir>/.gopd-train.lock`` held by the job's
  launcher (or rank 0). A second job on the same directory fails with the holder's host and pid;
  the kernel drops the lock when its holder dies, so a lock left by a killed job never blocks.
* `launch_local_ranks`: starts a local job's ranks itself (no torchrun agent in between), so that
  SIGTERM / SIGUSR1 / SIGHUP sent to the launcher (or to its whole process group) reach the ranks
  (which checkpoint and stop), and the ranks get SIGTERM if the launcher dies, even by SIGKILL.

Checkpoints are written without any helper process of megatron-core's (`checkpointing` passes the
writer's results through an in-process queue), so a signal to the whole process group, as
schedulers send, cannot kill part of a save: the forked file writers inherit the rank's stop
handler, which only sets a flag.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

LOCK_FILE = ".gopd-train.lock"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""What a scheduler sends before a time limit or preemption: checkpoint after this step and stop."""


_stop_requested = threading.Event()
"""Set by `latch_stop_signals`' handler: a stop signal arrived (possibly before the trainer existed)."""


def latch_stop_signals() -> None:
    """From now on a stop signal (SIGTERM, SIGUSR1) only records that a stop was asked for.

    Call it first thing in a process that will train: a launcher may start it with those signals
    ignored (torchrun inside a Slurm step) or a signal may come while it still imports and loads,
    and either way the request must not be lost or kill the rank before its first checkpoint. The
    trainer reads it with `stop_requested`. Only the main thread can install handlers; elsewhere
    this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, frame: _stop_requested.set())


def stop_requested() -> bool:
    """Whether a stop signal arrived since `latch_stop_signals`."""
    return _stop_requested.is_set()


class OutputDirLockedError(ValueError):
    """Another live job holds the output directory."""


class OutputDirLock:
    """Exclusive use of an output directory for the lifetime of this process (see the module docstring)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> "OutputDirLock":
        """Take the lock or raise `OutputDirLockedError` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputDirLockedError(
                f"output_dir {self.path.parent} is in use by another gopd-train job "
                f"({holder}); wait for it, stop it, or choose another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%F %T')}\n".encode())
        self._fd = fd
        return self

    def fileno(self) -> int:
        """The locked file's descriptor: ranks that inherit it keep the lock until they exit."""
        if self._fd is None:
            raise ValueError("the lock is not held")
        return self._fd

    def release(self) -> None:
        """Give the directory back (also happens when the process exits)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def threads_per_rank(ranks: int, env: dict[str, str]) -> tuple[int, str]:
    """Intra-op threads for each of `ranks` local ranks, and where the number came from.

    ``OMP_NUM_THREADS`` in `env` wins; otherwise this machine's usable cores divided among the ranks
    (at least 1). Ranks left at torch's default each start one thread per core, and on a machine with
    fewer cores than ranks x cores they slow each other down several-fold.
    """
    if env.get("OMP_NUM_THREADS", "").strip():
        try:
            return max(1, int(env["OMP_NUM_THREADS"])), "OMP_NUM_THREADS"
        except ValueError:
            raise ValueError(f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']!r} is not a whole number") from None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // ranks), f"{cores} cores / {ranks} ranks; set OMP_NUM_THREADS to override"


def launch_local_ranks(
    ranks: int, argv: Sequence[str], env: dict[str, str], master_port: int, pass_fds: Sequence[int] = ()
) -> int:
    """Start `ranks` processes ``python <argv>`` as one local job (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT set as torchrun would) and return the job's exit code. Each rank gets
    `threads_per_rank` threads (``OMP_NUM_THREADS``), which the log line that starts them names.

    Signals to this launcher reach every rank: SIGTERM, SIGUSR1 (a scheduler's warning) and SIGHUP
    (as SIGTERM) make them checkpoint after the current step and exit; SIGINT stops them. Each rank
    gets SIGTERM when the launcher dies, even by SIGKILL (PR_SET_PDEATHSIG), so no rank outlives it
    by more than its stop checkpoint. When one rank fails, the others are stopped. `pass_fds` (e.g.
    the output directory's lock) stay open in the ranks until they exit.
    """
    env = dict(env)
    threads, source = threads_per_rank(ranks, env)
    env["OMP_NUM_THREADS"] = str(threads)
    logger.info("starting %d local ranks, %d thread%s each (%s)", ranks, threads, "" if threads == 1 else "s", source)
    workers = []
    for rank in range(ranks):
        rank_env = {
            **env,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(ranks),
            "LOCAL_WORLD_SIZE": str(ranks),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(master_port),
        }
        workers.append(
            subprocess.Popen(
                [sys.executable, *argv], env=rank_env, preexec_fn=_die_with_parent, pass_fds=tuple(pass_fds)
            )
        )

    def forward(signum, frame) -> None:
        sent = signal.SIGTERM if signum == signal.SIGHUP else signum
        logger.warning("forwarding signal %d to the %d local ranks", signum, ranks)
        _signal_all(workers, sent)

    handled = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)
    previous = (
        {s: signal.signal(s, forward) for s in handled} if threading.current_thread() is threading.main_thread() else {}
    )
    try:
        return _wait_for_ranks(workers)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _signal_all(workers, signal.SIGKILL)  # nothing is left running when the launcher returns


def _signal_all(workers: list, signum: int) -> None:
    for worker in workers:
        if worker.poll() is None:
            try:
                worker.send_signal(signum)
            except ProcessLookupError:
                pass


def _wait_for_ranks(workers: list, grace_s: float = 60.0) -> int:
    """Wait for every rank; the first failure stops the others (SIGTERM, SIGKILL after `grace_s`)."""
    failed_at = None
    while True:
        codes = [w.poll() for w in workers]
        if all(c is not None for c in codes):
            return next((c for c in codes if c != 0), 0)
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
            logger.error("a rank exited with %s; stopping the others", next(c for c in codes if c not in (None, 0)))
            _signal_all(workers, signal.SIGTERM)
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            _signal_all(workers, signal.SIGKILL)
        time.sleep(0.2)
