"""Run a test body on N gloo ranks, with a pool of rank processes kept for the whole test session.

Starting a rank costs ~6-10 s of importing torch and megatron-core, so ranks are started once per
world size and reused: every `run_distributed` call ships a module-level function to all ranks of the
pool, waits for every rank's result, and reports every rank's failure with its traceback and the tail
of its log. A rank that hangs (a collective that never completes) fails the call after `timeout`
seconds; the pool is then torn down and the next call starts a fresh one.

Usage in a test module::

    def _body(rank: int, world_size: int, tp: int) -> float:   # runs in every rank
        ...
        return value

    def test_something():
        results = run_distributed(_body, world_size=2, tp=2)   # one entry per rank

Inside a body torch.distributed is initialised (gloo on CPU) through `megatron_gopd.platform`; a body
that initialises Megatron's parallel state need not tear it down: the harness does after every call.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import os
import queue
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

REPO_ROOT = Path(__file__).resolve().parents[1]
# A failing rank often leaves its peers blocked in a collective; give them this long to notice.
_GRACE_AFTER_FAILURE_S = 10.0


class DistributedTestError(AssertionError):
    """One or more ranks failed or timed out; the message holds every rank's report."""


@dataclasses.dataclass
class _RankReport:
    rank: int
    ok: bool
    value: Any = None
    error: str = ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_main(rank: int, world_size: int, port: int, log_path: str, tasks, results) -> None:
    # Send everything this rank prints (Python and C++) to its own log, read back on failure.
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    sys.path.insert(0, str(REPO_ROOT))
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch

    torch.set_num_threads(1)  # N ranks share 2 cores: oversubscription only slows every rank
    from megatron_gopd import platform

    platform.init_distributed()
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent:  # the test session died without closing the pool
                os._exit(1)
            continue
        if task is None:
            break
        task_id, module_name, fn_name, kwargs = task
        print(f"--- task {task_id}: {module_name}.{fn_name}", flush=True)
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
            value = fn(rank, world_size, **kwargs)
            results.put((task_id, _RankReport(rank, True, value)))
        except BaseException:  # noqa: BLE001 - every failure is reported to the parent
            results.put((task_id, _RankReport(rank, False, error=traceback.format_exc())))
        finally:
            platform.destroy_model_parallel()
    platform.shutdown_distributed()


class _Pool:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"gopd-dist{world_size}-"))
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.task_queues = [ctx.Queue() for _ in range(world_size)]
        port = _free_port()
        self.procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, world_size, port, str(self.log_path(rank)), self.task_queues[rank], self.results),
                # Not daemonic: dist_checkpointing's writer starts helper processes of its own.
                daemon=False,
            )
            for rank in range(world_size)
        ]
        for proc in self.procs:
            proc.start()
        self.next_task = 0

    def log_path(self, rank: int) -> Path:
        return self.log_dir / f"rank{rank}.log"

    def log_tail(self, rank: int, chars: int = 4000) -> str:
        try:
            return self.log_path(rank).read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def run(self, fn: Callable[..., Any], timeout: float, kwargs: dict) -> list[Any]:
        task_id = self.next_task
        self.next_task += 1
        for task_queue in self.task_queues:
            task_queue.put((task_id, fn.__module__, fn.__qualname__, kwargs))
        reports: dict[int, _RankReport] = {}
        deadline = time.monotonic() + timeout
        while len(reports) < self.world_size:
            if any(not r.ok for r in reports.values()):
                deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
            dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in reports]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or dead:
                break
            try:
                got_id, report = self.results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if got_id == task_id:
                reports[report.rank] = report
        if len(reports) == self.world_size and all(r.ok for r in reports.values()):
            return [reports[r].value for r in range(self.world_size)]
        raise DistributedTestError(self._failure_message(fn, reports, timeout))

    def _failure_message(self, fn: Callable, reports: dict[int, _RankReport], timeout: float) -> str:
        lines = [f"{fn.__module__}.{fn.__qualname__} failed on {self.world_size} ranks:"]
        for rank in range(self.world_size):
            report = reports.get(rank)
            if report is None:
                state = (
                    "died"
                    if not self.procs[rank].is_alive()
                    else f"no result (timeout {timeout:.0f} s, or blocked behind a failed peer)"
                )
                lines.append(f"--- rank {rank}: {state}; log tail:\n{self.log_tail(rank)}")
            elif not report.ok:
                lines.append(f"--- rank {rank} raised:\n{report.error}")
            else:
                lines.append(f"--- rank {rank}: ok")
        return "\n".join(lines)

    def close(self) -> None:
        for task_queue in self.task_queues:
            try:
                task_queue.put(None)
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


_POOLS: dict[int, _Pool] = {}


def run_distributed(fn: Callable[..., Any], world_size: int, timeout: float = 300.0, **kwargs: Any) -> list[Any]:
    """Run `fn(rank, world_size, **kwargs)` on `world_size` gloo ranks; return the per-rank results.

    `fn` must be a module-level function of an importable module (test modules are: `tests` is a
    package) and its kwargs and result picklable. Raises `DistributedTestError` naming every rank's
    failure, or the ranks that produced nothing within `timeout` seconds.
    """
    pool = _POOLS.get(world_size)
    if pool is None or not all(p.is_alive() for p in pool.procs):
        if pool is not None:
            pool.close()
        pool = _POOLS[world_size] = _Pool(world_size)
    try:
        return pool.run(fn, timeout, kwargs)
    except BaseException:
        # A failed run may leave ranks mid-collective: start the next run on fresh processes.
        _POOLS.pop(world_size, None)
        pool.close()
        raise


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
