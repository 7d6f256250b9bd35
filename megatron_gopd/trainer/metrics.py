"""A step's metrics: typed accumulators reduced over ranks, and the writer of ``metrics.jsonl``.

The loss adds what it measures to a `MetricSums` per micro-batch (`add_mean` for a weighted mean,
`add_sum` for a count); `reduce_step_metrics` sums them over micro-batches and ranks and divides.
Names are not declared anywhere in advance: a new loss metric appears in ``metrics.jsonl`` as soon
as the loss adds it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

Number = Union[float, int, torch.Tensor]


class MetricSums:
    """Named sums of one micro-batch (or of many, merged): weighted means and plain counts.

    A mean is kept as (sum of value x weight, sum of weight) so that means over micro-batches and
    ranks of different sizes come out exactly token-weighted. Values may be 0-dim tensors on any
    device; they are turned into Python numbers only when the step is reduced (one host sync).
    """

    def __init__(self) -> None:
        self.means: dict[str, list[Number]] = {}
        self.sums: dict[str, Number] = {}

    def add_mean(self, name: str, weighted_total: Number, weight: Number) -> None:
        """Add to the mean `name`: `weighted_total` is sum(value x weight), `weight` e.g. a token count."""
        entry = self.means.setdefault(name, [0.0, 0.0])
        entry[0] = entry[0] + weighted_total
        entry[1] = entry[1] + weight

    def add_token_means(self, means: Mapping[str, Number], tokens: Number) -> None:
        """Add per-token means measured over `tokens` tokens (each weighted by `tokens`)."""
        for name, value in means.items():
            self.add_mean(name, value * tokens, tokens)

    def add_sum(self, name: str, value: Number) -> None:
        """Add `value` to the count `name` (reported as the step's total)."""
        self.sums[name] = self.sums.get(name, 0.0) + value

    def merge(self, other: "MetricSums") -> None:
        """Add every entry of `other` to this one."""
        for name, (total, weight) in other.means.items():
            self.add_mean(name, total, weight)
        for name, value in other.sums.items():
            self.add_sum(name, value)


def reduce_step_metrics(
    collected: Iterable[MetricSums], contributes: bool, group: Optional[dist.ProcessGroup] = None
) -> dict[str, float]:
    """The step's metrics, identical on every rank of `group` (collective; default: the world).

    Only ranks with `contributes` add their `collected` sums (one rank per model replica: the last
    pipeline stage, tensor-parallel rank 0), so that no micro-batch is counted twice. A mean is
    sum(value x weight) / sum(weight) over everything; one whose weight is 0 over the whole step
    (e.g. a teacher whose domain drew no prompts) is left out.
    """
    step = MetricSums()
    if contributes:
        for sums in collected:
            step.merge(sums)
    local_names = sorted([("mean", n) for n in step.means] + [("sum", n) for n in step.sums])
    names = local_names
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local_names, group=group)
        names = sorted({tuple(entry) for entries in gathered for entry in entries})
    totals = torch.zeros(2, len(names), dtype=torch.float64)  # [value, weight] per name
    for i, (kind, name) in enumerate(names):
        if kind == "mean" and name in step.means:
            totals[0, i], totals[1, i] = (float(x) for x in step.means[name])
        elif kind == "sum" and name in step.sums:
            totals[0, i] = float(step.sums[name])
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
    out: dict[str, float] = {}
    for (kind, name), value, weight in zip(names, *totals.tolist()):
        if kind == "sum":
            out[name] = value
        elif weight != 0:
            out[name] = value / weight
    return out


class MetricsWriter:
    """One JSON object per step in ``metrics.jsonl`` (plus TensorBoard when installed), rank 0 only.

    On resume the lines of steps after the checkpoint (written before a crash) are dropped, so the
    file always describes one consistent run.
    """

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line, step in self._read_steps() if step <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:
            logger.info("tensorboard is not installed; metrics go to metrics.jsonl only")

    def _read_steps(self) -> list[tuple[str, int]]:
        """(line, step) of every complete line; a torn last line (a kill mid-write) is dropped, any
        other unreadable line is an error naming the file and line."""
        lines = [line for line in self.path.read_text(errors="replace").splitlines() if line.strip()]
        out = []
        for number, line in enumerate(lines, start=1):
            try:
                out.append((line, int(json.loads(line)["step"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                if number == len(lines):
                    logger.warning("%s: dropping its torn last line (written when the run was killed)", self.path)
                    break
                raise ValueError(
                    f"{self.path}, line {number}: not a metrics record ({err}); fix or remove the line to resume"
                ) from err
        return out

    def write(self, metrics: dict[str, Any]) -> None:
        """Append one step's metrics (a dict with ``step``)."""
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.tb is not None:
            for name, value in metrics.items():
                if name != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(name, value, metrics["step"])

    def close(self) -> None:
        """Flush and close the files."""
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over the run's steps (disabled on every rank but the one that logs)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="gopd-train", unit="step", dynamic_ncols=True)


def first_with_prefix(metrics: Mapping[str, float], prefix: str) -> str:
    """The first metric whose name starts with `prefix`, formatted for the progress bar ("-" if none)."""
    values = [v for k, v in metrics.items() if k.startswith(prefix)]
    return f"{values[0]:.4f}" if values else "-"
