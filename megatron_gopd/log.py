"""Rank-aware logging: rank 0 speaks, other ranks only warn (or everyone, when asked).

Library modules use ``logging.getLogger(__name__)``; entry points call `setup_logging()` once.
Set ``GOPD_LOG_ALL_RANKS=1`` to see every rank's info messages (each line carries its rank).
"""

from __future__ import annotations

import logging
import os
import sys

ALL_RANKS_ENV = "GOPD_LOG_ALL_RANKS"


def current_rank() -> int:
    """This process's global rank (0 before torch.distributed starts)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


class _RankFilter(logging.Filter):
    """Lets rank 0 through at the configured level and the other ranks at WARNING and above."""

    def __init__(self, all_ranks: bool) -> None:
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        rank = current_rank()
        record.rank = rank
        return self.all_ranks or rank == 0 or record.levelno >= logging.WARNING


def setup_logging(level: str | int = "INFO", all_ranks: bool | None = None) -> None:
    """Configure the ``megatron_gopd`` loggers for this process (idempotent)."""
    if all_ranks is None:
        all_ranks = os.environ.get(ALL_RANKS_ENV, "") not in ("", "0")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(all_ranks))
    handler.setFormatter(
        logging.Formatter("[%(asctime)s rank%(rank)s %(levelname)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    )
    root = logging.getLogger("megatron_gopd")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
