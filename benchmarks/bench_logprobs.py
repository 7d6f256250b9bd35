"""Peak memory and time of token log-probs + entropy + backward: chunked vs naive log_softmax.

Four variants, each measured in a fresh subprocess so that no allocation of one leaks into another:

* ``hidden-chunked``: `token_logprobs_from_hidden` (the headline: logits never exist);
* ``hidden-naive``: ``logits = hidden @ W.T``, then ``log_softmax(logits.float())``;
* ``logits-chunked``: `token_logprobs_from_logits` on given vocab-parallel logits;
* ``logits-naive``: ``log_softmax(logits.float())`` on the same logits.

Each computes the sampled-token log-prob and the entropy of every token, and backpropagates
``logp.sum() + entropy.sum()`` to its inputs. Peak memory is the process's peak resident set during
that call minus its resident set just before (inputs allocated, kernels warmed up): on Linux the
kernel's peak counter is reset first (``/proc/self/clear_refs``, then ``VmHWM``), so the figure is
exact and includes every temporary and the input gradients (e.g. the [V, h] weight gradient).
Time is the wall-clock and the process CPU time (user + sys, all threads) of the same call; on a
shared machine the CPU time is the steadier of the two. Rounds interleave the variants; each variant
runs ``--repeats`` times and medians are printed.

Defaults: V = 151,936 (Qwen3), T = 4,096 tokens (s = 4096, b = 1), h = 1024, fp32 hidden states and
weight, bf16 logits for the logits path (Megatron's output dtype). The naive variants need ~12 GB at
these sizes. A round of the four variants takes ~3-4 minutes on 2 idle cores (much longer on busy
ones): ``--repeats 1`` for a single round, ``--tokens 1024`` for a ~4x smaller run.

    .venv/bin/python benchmarks/bench_logprobs.py [--tokens 4096] [--hidden 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from megatron_gopd.logprobs import (  # noqa: E402
    token_logprobs_from_hidden,
    token_logprobs_from_logits,
)
from megatron_gopd.testing.memory import reset_peak_rss as _reset_peak_rss  # noqa: E402
from megatron_gopd.testing.memory import rss_field_bytes as _rss_bytes  # noqa: E402

VARIANTS = ("hidden-chunked", "hidden-naive", "logits-chunked", "logits-naive")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 2**20


# ----------------------------------------------------------------------------------------------
# The variants


def _naive(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # [s, b, V] fp32
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # [s, b]
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy


def _first(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """The first n positions; the tensor itself when n covers it (a slice would make autograd
    allocate a full-size zero gradient to scatter into, inflating the measured peak)."""
    return tensor if n >= tensor.shape[0] else tensor[:n]


def _make_step(variant: str, args: argparse.Namespace) -> tuple[Callable[[int], None], list]:
    """Inputs for `variant`, and a function running log-prob + entropy + backward on n tokens."""
    gen = torch.Generator().manual_seed(0)
    tokens, vocab, hidden_size = args.tokens, args.vocab, args.hidden
    targets = torch.randint(0, vocab, (tokens, 1), generator=gen)  # [s, b = 1]
    chunk = args.chunk_size
    if variant.startswith("hidden"):
        dtype = DTYPES[args.hidden_dtype]
        hidden = torch.randn(tokens, 1, hidden_size, generator=gen, dtype=dtype)  # [s, b, h]
        # Uniform init (std 1/sqrt(h)) is several times faster than randn at 155M elements.
        bound = 3**0.5 / hidden_size**0.5
        weight = torch.empty(vocab, hidden_size, dtype=dtype).uniform_(-bound, bound, generator=gen)
        hidden.requires_grad_()
        weight.requires_grad_()
        inputs = [hidden, weight]

        def step(n: int) -> None:
            hidden_n, targets_n = _first(hidden, n), _first(targets, n)
            if variant == "hidden-chunked":
                logp, entropy = token_logprobs_from_hidden(
                    hidden_n, weight, targets_n, chunk_size=chunk, with_entropy=True
                )
            else:
                logp, entropy = _naive(hidden_n @ weight.t(), targets_n)
            (logp.sum() + entropy.sum()).backward()
    else:
        dtype = DTYPES[args.logits_dtype]
        logits = torch.empty(tokens, 1, vocab, dtype=dtype).uniform_(-5.0, 5.0, generator=gen)
        logits.requires_grad_()  # [s, b, V]
        inputs = [logits]

        def step(n: int) -> None:
            logits_n, targets_n = _first(logits, n), _first(targets, n)
            if variant == "logits-chunked":
                logp, entropy = token_logprobs_from_logits(logits_n, targets_n, chunk_size=chunk, with_entropy=True)
            else:
                logp, entropy = _naive(logits_n, targets_n)
            (logp.sum() + entropy.sum()).backward()

    return step, inputs


def _worker(variant: str, args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process."""
    torch.manual_seed(0)
    step, inputs = _make_step(variant, args)
    step(8)  # warm up kernels on a few tokens, then drop the gradients
    for tensor in inputs:
        tensor.grad = None
    exact = _reset_peak_rss()
    rss_before = _rss_bytes("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    step(args.tokens)
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    if exact:
        peak = _rss_bytes("VmHWM") - rss_before
    else:  # ru_maxrss is a lifetime maximum: an upper bound of the call's peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - min(rss_before, maxrss_before)
    return {"variant": variant, "wall_s": wall, "cpu_s": cpu, "peak_bytes": peak, "exact_peak": exact}


# ----------------------------------------------------------------------------------------------
# Driver


def _run_in_subprocess(variant: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, *argv]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="T = s * b tokens (b = 1)")
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary V (TP = 1)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size h")
    parser.add_argument("--hidden-dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--logits-dtype", choices=DTYPES, default="bf16")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="tokens per chunk (default: the library's ~256 MiB chunks)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per variant")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args)))
        return
    forwarded = [
        "--tokens",
        str(args.tokens),
        "--vocab",
        str(args.vocab),
        "--hidden",
        str(args.hidden),
        "--hidden-dtype",
        args.hidden_dtype,
        "--logits-dtype",
        args.logits_dtype,
    ]
    if args.chunk_size is not None:
        forwarded += ["--chunk-size", str(args.chunk_size)]
    print(
        f"log-prob + entropy + backward, V={args.vocab}, T={args.tokens}, h={args.hidden}, "
        f"hidden/weight {args.hidden_dtype}, logits {args.logits_dtype}, "
        f"chunk={args.chunk_size or 'auto'}, torch threads={torch.get_num_threads()}, "
        f"median of {args.repeats} fresh processes per variant",
        flush=True,
    )
    print(f"  load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    # Rounds interleave the variants, so that load from other processes on a shared machine hits
    # every variant alike rather than whichever happened to run during a busy minute.
    all_runs: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    bench_start = time.perf_counter()
    for round_index in range(args.repeats):
        for variant in args.variants:
            run = _run_in_subprocess(variant, forwarded)
            all_runs[variant].append(run)
            print(
                f"  [{time.perf_counter() - bench_start:6.0f} s] round {round_index + 1} "
                f"{variant:15s} wall {run['wall_s']:7.2f} s  cpu {run['cpu_s']:7.2f} s  "
                f"peak {run['peak_bytes'] / MIB:8.1f} MiB",
                flush=True,
            )
    print(
        f"  load average at end: {os.getloadavg()[0]:.1f}  (wall times are only comparable on "
        "an otherwise idle machine; process CPU time is less sensitive to other load)"
    )
    medians: dict[str, dict[str, float]] = {}
    for variant, runs in all_runs.items():
        medians[variant] = {key: statistics.median(r[key] for r in runs) for key in ("peak_bytes", "wall_s", "cpu_s")}
        note = "" if all(r["exact_peak"] for r in runs) else " (ru_maxrss upper bound)"
        median = medians[variant]
        print(
            f"  median {variant:15s} peak {median['peak_bytes'] / MIB:9.1f} MiB{note}"
            f"   wall {median['wall_s']:7.2f} s   cpu {median['cpu_s']:7.2f} s",
            flush=True,
        )
    for path in ("hidden", "logits"):
        chunked, naive = medians.get(f"{path}-chunked"), medians.get(f"{path}-naive")
        if chunked and naive:
            ratio = {key: chunked[key] / naive[key] for key in chunked}
            print(
                f"  ratio {path:6s} chunked / naive: peak memory {ratio['peak_bytes']:.3f}x   "
                f"wall {ratio['wall_s']:.3f}x   cpu {ratio['cpu_s']:.3f}x   "
                "(target: <= 0.25x memory at <= 1.5x time)"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
