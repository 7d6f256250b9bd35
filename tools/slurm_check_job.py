"""A stand-in for gopd-train's checkpoint / resume contract, run by tools/slurm_check.sh (no torch).

What it shares with gopd-train, and what the Slurm templates rely on:
- the output directory comes from ``--output-dir`` or ``$GOPD_OUTPUT_DIR`` (set by the templates);
- rank 0 appends one JSON line per step to ``<output_dir>/metrics.jsonl`` and writes a checkpoint
  ``<output_dir>/checkpoints/step-NNNNNN/`` every ``--save-every`` steps (to a temporary name, then
  renamed, so a checkpoint directory is always complete);
- on start it resumes after the latest checkpoint, so the same command, requeued, continues;
- on SIGUSR1 or SIGTERM it saves a checkpoint at the end of the current step and exits 0.
Every rank runs the same steps; only rank 0 writes. Rank and attempt come from torchrun or Slurm.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

STOP_REQUESTED: list[str] = []


def latest_checkpoint(ckpt_dir: Path) -> int:
    """The step of the newest complete checkpoint, or 0 when there is none."""
    steps = [int(p.name.split("-")[1]) for p in ckpt_dir.glob("step-*") if p.name.split("-")[1].isdigit()]
    return max(steps, default=0)


def save_checkpoint(ckpt_dir: Path, step: int, attempt: int) -> None:
    final = ckpt_dir / f"step-{step:06d}"
    if final.exists():
        return
    tmp = ckpt_dir / f".tmp-step-{step:06d}"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "state.json").write_text(json.dumps({"step": step, "attempt": attempt}))
    tmp.rename(final)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=os.environ.get("GOPD_OUTPUT_DIR"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--step-seconds", type=float, default=0.25)
    parser.add_argument("--save-every", type=int, default=5)
    args = parser.parse_args()
    if not args.output_dir:
        parser.error("--output-dir or $GOPD_OUTPUT_DIR is required")

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    out = Path(args.output_dir)
    ckpt_dir = out / "checkpoints"
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: STOP_REQUESTED.append(signal.Signals(signum).name))

    start = latest_checkpoint(ckpt_dir)
    if rank == 0:
        where = f"resumed from checkpoint step-{start:06d}" if start else "starting from scratch"
        print(f"attempt {attempt}: {where}", flush=True)
    for step in range(start, args.steps):
        time.sleep(args.step_seconds)
        done = step + 1
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as metrics:
                metrics.write(json.dumps({"step": done, "attempt": attempt}) + "\n")
            if done % args.save_every == 0 or STOP_REQUESTED:
                save_checkpoint(ckpt_dir, done, attempt)
        if STOP_REQUESTED:
            if rank == 0:
                print(
                    f"attempt {attempt}: {STOP_REQUESTED[0]} received: checkpoint step-{done:06d} saved, exiting",
                    flush=True,
                )
            return 0
    if rank == 0:
        save_checkpoint(ckpt_dir, args.steps, attempt)
        print(f"attempt {attempt}: finished {args.steps} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
