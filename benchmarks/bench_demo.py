#!/usr/bin/env python
"""Wall time of every stage of the toy demo, against the cost of starting one command.

    python benchmarks/bench_demo.py                    # runs the demo into a fresh directory (~20 min)
    python benchmarks/bench_demo.py --out outputs/demo # reports a finished demo's timings.json

Every demo stage is a separate `gopd-*` command on 2 CPU ranks, and each start-up (torch and
megatron-core imports, gloo rendezvous, model build) costs seconds. The baseline, measured in the
same run, is the median of three minimal `gopd-eval` launches (the demo's initial model, one prompt,
one token); each stage is printed with its ratio to it, and the total with the share of it that is
start-up rather than work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "toy" / "demo.py"


def launch_baseline(out: Path, nproc: int, repeats: int = 3) -> float:
    """Median seconds of a `gopd-eval` that loads the demo's initial model and generates one token."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "megatron_gopd.cli",
                "gopd-eval",
                "--model",
                str(out / "init" / "hf"),
                "--data",
                str(out / "data" / "val.jsonl"),
                "--k",
                "1",
                "--max-prompts",
                "2",
                "--max-new-tokens",
                "1",
                "--nproc",
                str(nproc),
                "--log-level",
                "WARNING",
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="a demo output directory to report (run the demo there first if incomplete)",
    )
    parser.add_argument("--smoke", action="store_true", help="time the 2-step smoke demo instead")
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="gopd-bench-demo-"))).resolve()
    if not (out / "results.json").is_file():
        command = [sys.executable, str(DEMO), "--out", str(out), "--nproc", str(args.nproc)]
        subprocess.run(command + (["--smoke"] if args.smoke else []), cwd=REPO, check=True)
    timings: dict[str, float] = json.loads((out / "timings.json").read_text())
    baseline = launch_baseline(out, args.nproc)

    launches = sum(1 for name in timings if name not in ("data", "init") and not name.startswith("expo/"))
    total = sum(timings.values())
    width = max(len(name) for name in timings)
    print(f"{'stage':<{width}}  seconds  x launch")
    for name, seconds in timings.items():
        print(f"{name:<{width}}  {seconds:7.1f}  {seconds / baseline:8.1f}")
    print(f"{'total':<{width}}  {total:7.1f}  {total / baseline:8.1f}")
    print(f"\nbaseline: one minimal gopd-eval launch on {args.nproc} ranks = {baseline:.1f} s (median of 3)")
    print(
        f"{launches} distributed launches ~ {launches * baseline:.0f} s = "
        f"{100 * launches * baseline / total:.0f}% of the demo's wall time is start-up"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
