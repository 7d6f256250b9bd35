#!/usr/bin/env python
"""HF -> Megatron conversion: throughput (GB/s) and peak RSS per rank against the checkpoint size.

    python benchmarks/bench_convert.py [--hidden 1024 --layers 8 --vocab 32000 --ranks 2 --repeat 3]

Builds a random Qwen3 of the given size with `transformers` (saved in 200 MB shards), then, each in
fresh processes and `--repeat` times, interleaved:
  * baseline "plain read": a naive converter's load (every tensor of the checkpoint in one
    process's memory),
  * baseline "fsync'd write": the checkpoint's byte count written to new files next to the
    conversion outputs and fsync'ed (what a durable checkpoint write cannot beat),
  * ``gopd-convert hf-to-mcore`` at TP=1 on 1 rank and at TP=``--ranks`` on ``--ranks`` ranks,
and prints median wall times, throughput per rank and each rank's peak RSS above its post-import
baseline, with the ratio to the checkpoint size. The conversion's end-to-end throughput per rank is
compared with the plain read (target >= 0.5x) and with the bound that reading and then durably
writing the same bytes sets. Sliced loading should keep a TP=N rank near size/N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
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


def _worker_fsync_write(out: str, size: int, files: int) -> None:
    """The disk's durable write bandwidth: `size` bytes over `files` new files, each fsync'ed."""
    block = os.urandom(16 << 20)
    start = time.perf_counter()
    for index in range(files):
        left = size // files
        with open(Path(out) / f"write-bound-{index}.bin", "wb") as f:
            while left > 0:
                left -= f.write(memoryview(block)[: min(left, len(block))])
            os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    for index in range(files):
        (Path(out) / f"write-bound-{index}.bin").unlink()
    result = {"rank": 0, "growth_mb": 0.0, "exact": True, "seconds": seconds, "read_seconds": 0.0}
    Path(os.environ[_RSS_ENV], "rank0.json").write_text(json.dumps({**result, "write_seconds": seconds}))


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
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians are printed")
    parser.add_argument("--worker", choices=["convert", "full-load", "fsync-write"], help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "convert":
        return _worker_convert(args.hf_dir, args.out, args.tp)
    if args.worker == "full-load":
        return _worker_full_load(args.hf_dir)
    if args.worker == "fsync-write":
        return _worker_fsync_write(args.out, args.bytes, files=2)

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

    def convert_cmd(ranks: int, out: Path) -> list[str]:
        return [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), __file__),
            *("--worker", "convert", "--hf-dir", str(hf_dir), "--out", str(out), "--tp", str(ranks)),
        ]

    size_bytes = _dir_bytes(hf_dir)
    names = {
        "read": "plain read (baseline)",
        "write": "fsync'd write (baseline)",
        "tp1": "gopd-convert tp=1, 1 rank",
        "tpN": f"gopd-convert tp={args.ranks}, {args.ranks} ranks",
    }
    runs: dict[str, list[list[dict]]] = {key: [] for key in names}
    for rep in range(args.repeat):  # interleaved, so that a busy moment of the host hits every run alike
        runs["read"].append(_run([*me, "--worker", "full-load", "--hf-dir", str(hf_dir)], work / f"rss_read{rep}"))
        runs["write"].append(
            _run([*me, "--worker", "fsync-write", "--out", str(work), "--bytes", str(size_bytes)], work / f"rss_w{rep}")
        )
        runs["tp1"].append(_run(convert_cmd(1, work / f"ck1-{rep}"), work / f"rss_tp1-{rep}"))
        runs["tpN"].append(_run(convert_cmd(args.ranks, work / f"ckN-{rep}"), work / f"rss_tpN-{rep}"))

    def median_field(key: str, field: str) -> float:
        """Median over the repeats of the slowest rank's `field`."""
        return statistics.median(max(r[field] for r in ranks) for ranks in runs[key])

    print(
        f"{'run':<36} {'total s':>8} {'read s':>7} {'write s':>8} {'GB/s/rank':>9}  peak RSS growth per rank "
        f"(x checkpoint size; medians of {args.repeat})"
    )
    per_rank_gb_s = {}
    for key, name in names.items():
        ranks = len(runs[key][0])
        per_rank_gb_s[key] = size_mb / 1e3 / ranks / max(median_field(key, "seconds"), 1e-9)
        growth = [statistics.median(rep[i]["growth_mb"] for rep in runs[key]) for i in range(ranks)]
        per_rank = "  ".join(f"r{i}: {g:.0f} MB ({g / size_mb:.2f}x)" for i, g in enumerate(growth))
        print(
            f"{name:<36} {median_field(key, 'seconds'):8.2f} {median_field(key, 'read_seconds'):7.2f} "
            f"{median_field(key, 'write_seconds'):8.2f} {per_rank_gb_s[key]:9.3f}  {per_rank}"
        )
    read_s, write_s = median_field("read", "seconds"), median_field("write", "seconds")
    # The fastest a conversion that reads its bytes and then writes them durably can be, per rank.
    bound_gb_s = size_mb / 1e3 / (read_s + write_s)
    print(f"plain read {per_rank_gb_s['read']:.3f} GB/s, fsync'd write {per_rank_gb_s['write']:.3f} GB/s")
    print(
        f"read then fsync'd write of the same bytes: {bound_gb_s:.3f} GB/s "
        f"= {bound_gb_s / per_rank_gb_s['read']:.2f}x of a plain read (the bound for a conversion that does not "
        "overlap reading and writing)"
    )
    for key in ("tp1", "tpN"):
        print(
            f"ratio: {names[key]} end-to-end per rank / plain read = {per_rank_gb_s[key] / per_rank_gb_s['read']:.2f} "
            f"(target >= 0.5); / read-then-write bound = {per_rank_gb_s[key] / bound_gb_s:.2f}"
        )
    tp1_read_s = median_field("tp1", "read_seconds")
    print(f"ratio: tp=1 read phase / plain read = {read_s / max(tp1_read_s, 1e-9):.2f}")
    worst = max(statistics.median(rep[i]["growth_mb"] for rep in runs["tpN"]) for i in range(args.ranks))
    base_peak = statistics.median(rep[0]["growth_mb"] for rep in runs["read"])
    print(f"ratio: worst tp={args.ranks} rank peak / naive full-load peak = {worst / max(base_peak, 1e-9):.2f}")
    if not all(r["exact"] for reps in runs.values() for ranks in reps for r in ranks):
        print("note: the kernel refused to reset the peak-RSS counter; peaks are upper bounds")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
