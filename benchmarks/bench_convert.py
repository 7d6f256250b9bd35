#!/usr/bin/env python
"""HF -> Megatron conversion: throughput (GB/s) and peak RSS per rank against the checkpoint size.

    python benchmarks/bench_convert.py [--hidden 1024 --layers 8 --vocab 32000 --ranks 2]

Builds a random Qwen3 of the given size with `transformers` (saved in 200 MB shards), then, each in
fresh processes:
  * baseline: a naive converter's load (every tensor of the checkpoint in one process's memory),
  * ``gopd-convert hf-to-mcore`` at TP=1 on 1 rank and at TP=``--ranks`` on ``--ranks`` ranks,
and prints wall time, throughput and each rank's peak RSS above its post-import baseline, with the
ratio to the checkpoint size. Sliced loading should keep a TP=N rank near size/N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_gopd.testing.memory import PeakRSSGrowth

_RSS_ENV = "GOPD_BENCH_RSS_DIR"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def _worker_convert(hf_dir: str, out: str, tp: int) -> None:
    """One rank of the conversion (run under torchrun); writes its RSS figures to a JSON file."""
    import megatron.core  # noqa: F401
    import torch  # noqa: F401 - imported before measuring the baseline

    from megatron_gopd import platform
    from megatron_gopd.bridge.convert import hf_to_mcore
    from megatron_gopd.models import ParallelLayout

    env = platform.init_distributed()
    with PeakRSSGrowth() as growth:
        report = hf_to_mcore(hf_dir, out, ParallelLayout(tp=tp))
    result = {
        "rank": env.rank,
        "growth_mb": growth.bytes / 1e6,
        "exact": growth.exact,
        "seconds": report.seconds,
        "read_seconds": report.read_seconds,
        "write_seconds": report.write_seconds,
        "bytes_read": report.bytes,
    }
    Path(os.environ[_RSS_ENV], f"rank{env.rank}.json").write_text(json.dumps(result))
    platform.shutdown_distributed()


def _worker_full_load(hf_dir: str) -> None:
    """The naive converter's first step: every tensor of the checkpoint in one process's memory."""
    import torch  # noqa: F401
    from safetensors.torch import load_file

    # The peak is measured from a reset counter: ru_maxrss of a child started by fork + exec keeps
    # the parent's peak (the benchmark's own process built the whole model), hiding this load's.
    start = time.perf_counter()
    state = {}
    with PeakRSSGrowth() as growth:
        for file in sorted(Path(hf_dir).glob("*.safetensors")):
            state.update({k: v.clone() for k, v in load_file(str(file)).items()})  # clone: own the memory
    seconds = time.perf_counter() - start
    result = {
        "rank": 0,
        "growth_mb": growth.bytes / 1e6,
        "exact": growth.exact,
        "seconds": seconds,
        "read_seconds": seconds,
        "write_seconds": 0.0,
        "tensors": len(state),
    }
    Path(os.environ[_RSS_ENV], "rank0.json").write_text(json.dumps(result))


def _run(cmd: list[str], rss_dir: Path) -> list[dict]:
    rss_dir.mkdir()
    subprocess.run(
        cmd,
        check=True,
        env={**os.environ, _RSS_ENV: str(rss_dir)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return [json.loads(p.read_text()) for p in sorted(rss_dir.glob("rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--worker", choices=["convert", "full-load"], help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "convert":
        return _worker_convert(args.hf_dir, args.out, args.tp)
    if args.worker == "full-load":
        return _worker_full_load(args.hf_dir)

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    work = Path(tempfile.mkdtemp(prefix="gopd-bench-convert-"))
    hf_dir = work / "hf"
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        head_dim=64,
        tie_word_embeddings=False,
    )
    Qwen3ForCausalLM(config).save_pretrained(hf_dir, max_shard_size="200MB")
    size_mb = _dir_bytes(hf_dir) / 1e6
    print(f"checkpoint: Qwen3 hidden={args.hidden} layers={args.layers} vocab={args.vocab}: {size_mb:.0f} MB fp32")

    me = [sys.executable, __file__]
    runs = {
        "naive full load (baseline)": _run([*me, "--worker", "full-load", "--hf-dir", str(hf_dir)], work / "rss_full"),
        "gopd-convert tp=1, 1 rank": _run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "1",
                __file__,
                "--worker",
                "convert",
                "--hf-dir",
                str(hf_dir),
                "--out",
                str(work / "ck1"),
                "--tp",
                "1",
            ],
            work / "rss_tp1",
        ),
        f"gopd-convert tp={args.ranks}, {args.ranks} ranks": _run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                str(args.ranks),
                __file__,
                "--worker",
                "convert",
                "--hf-dir",
                str(hf_dir),
                "--out",
                str(work / "ckN"),
                "--tp",
                str(args.ranks),
            ],
            work / "rss_tpN",
        ),
    }
    print(
        f"{'run':<36} {'total s':>8} {'read s':>7} {'read GB/s':>9} {'write s':>8}  peak RSS growth per rank "
        "(x checkpoint size)"
    )
    for name, ranks in runs.items():
        slowest = max(ranks, key=lambda r: r["seconds"])
        read_gb_s = size_mb / 1e3 / len(ranks) / max(max(r["read_seconds"] for r in ranks), 1e-9)
        per_rank = "  ".join(f"r{r['rank']}: {r['growth_mb']:.0f} MB ({r['growth_mb'] / size_mb:.2f}x)" for r in ranks)
        print(
            f"{name:<36} {slowest['seconds']:8.2f} {slowest['read_seconds']:7.2f} {read_gb_s:9.3f} "
            f"{slowest['write_seconds']:8.2f}  {per_rank}"
        )
    base = runs["naive full load (baseline)"][0]
    tp1 = runs["gopd-convert tp=1, 1 rank"][0]
    tpn = runs[f"gopd-convert tp={args.ranks}, {args.ranks} ranks"]
    print(
        f"ratio: tp=1 read throughput / plain read = {base['read_seconds'] / max(tp1['read_seconds'], 1e-9):.2f} "
        "(target >= 0.5)"
    )
    worst = max(r["growth_mb"] for r in tpn)
    print(f"ratio: worst tp={args.ranks} rank peak / naive full-load peak = {worst / max(base['growth_mb'], 1e-9):.2f}")
    if not all(r["exact"] for rs in runs.values() for r in rs):
        print("note: the kernel refused to reset the peak-RSS counter; peaks are upper bounds")


if __name__ == "__main__":
    main()
