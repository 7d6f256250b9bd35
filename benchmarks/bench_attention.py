"""Peak memory and time of a model forward + backward: SDPA core attention vs the local spec's.

A small GPTModel (2 layers, hidden 128, 4 query heads of 32 in 2 key/value groups, vocabulary
512) runs one ``[1, s]`` sequence forward and backward (loss: mean log-prob of 50 vocabulary
entries at every position) with ``attention="sdpa"`` (`SDPAttention`: torch's
scaled_dot_product_attention) and ``attention="local"`` (megatron-core's `DotProductAttention`,
which materialises the fp32 scores ``[b, heads, s, s]``), at 2K / 8K / 16K tokens.

Each measurement runs in a fresh process (a world of one). CPU: peak memory is the rise of the
process's resident set above its size just before the step, the kernel's peak counter reset first
(exact on Linux); CUDA (``--device cuda``): ``max_memory_allocated`` minus the allocation before
the step. Two steps run at each length (gradients accumulate); the peak spans both, the time is the
second's: wall-clock (CUDA synchronised) and process CPU time. Rounds interleave
the variants; medians over ``--repeats`` rounds and the SDPA / local ratios are printed (targets:
memory <= 0.1x at 8K, time <= 1.0x).

The local spec's need grows as (layers + 3) x heads x s^2 x 4 bytes (one score buffer, the
probabilities each layer keeps for backward, two gradients of that size): 5 GiB at 8K and 20 GiB at
16K here, so runs whose estimate exceeds ``--local-limit-gb`` (default 8) are skipped with a note.
The memory ratio depends on the shape: the scores grow with heads x s, everything else with the
hidden size (heads x head_dim = hidden here, as in Qwen3).

    .venv/bin/python benchmarks/bench_attention.py [--tokens 2048 8192 16384] [--repeats 3]
        [--device cpu|cuda] [--dtype float32|bfloat16] [--threads 1]

About 6 minutes on 2 busy cores. Measured 2026-11-30 (torch 2.13 CPU, fp32, 1 thread, 2 cores
shared with other jobs, load 7-23; medians of 3): 2K: 95 vs 431 MiB (0.22x), wall 0.18x; 8K: 372 MiB
vs 5.5 GiB (0.066x), wall 2.0 s vs 17.0 s (0.12x), CPU 0.15x; 16K: SDPA 756 MiB, 8.2 s (local
skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

HF_CONFIG = dict(
    architectures=["Qwen3ForCausalLM"],
    model_type="qwen3",
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=512,
    max_position_embeddings=16384,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    hidden_act="silu",
)
VARIANTS = ("sdpa", "local")
MIB = 2**20


def local_bytes_estimate(tokens: int, dtype_bytes: int = 4) -> int:
    """What the local attention holds at its peak for one ``[1, tokens]`` sequence (see above)."""
    layers, heads = HF_CONFIG["num_hidden_layers"], HF_CONFIG["num_attention_heads"]
    return (layers + 3) * heads * tokens * tokens * dtype_bytes


# ----------------------------------------------------------------------------------------------
# One measurement (fresh process)


def _worker(variant: str, tokens: int, device: str, dtype: str, threads: int) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from megatron_gopd import platform
    from megatron_gopd.models import ModelArchitecture, ParallelLayout, build_gpt_model
    from megatron_gopd.testing.memory import PeakRSSGrowth

    platform.init_distributed()
    platform.init_model_parallel(tp=1, pp=1, seed=0)
    arch = ModelArchitecture.from_hf_config(HF_CONFIG, source="<bench>")
    model = build_gpt_model(arch, ParallelLayout(), dtype=dtype, attention=variant)
    gen = torch.Generator().manual_seed(0)
    on_cuda = device == "cuda"

    def step(length: int) -> None:
        ids = torch.randint(0, arch.vocab_size, (1, length), generator=gen).to(platform.device())
        positions = torch.arange(length, device=ids.device)[None]  # [1, s]
        logits = model(ids, positions, None)  # [1, s, V]
        logits[..., : arch.vocab_size].float().log_softmax(-1)[..., :50].mean().backward()

    step(128)
    for param in model.parameters():
        param.grad = None
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    # The first step at a new length pays one-off costs (page faults, thread start-up, the local
    # attention's score buffer): time the second; the peak spans both, so buffers that the first
    # allocates and the second reuses still count.
    with PeakRSSGrowth() as growth:
        step(tokens)
        if on_cuda:
            torch.cuda.synchronize()
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        step(tokens)
        if on_cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    peak = torch.cuda.max_memory_allocated() - before if on_cuda else growth.bytes
    return {
        "variant": variant,
        "tokens": tokens,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_bytes": peak,
        "exact_peak": on_cuda or growth.exact,
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_in_subprocess(variant: str, tokens: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--tokens",
        str(tokens),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
    }
    if args.device == "cpu":
        env["GOPD_FORCE_CPU"] = "1"
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Driver


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per variant")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="model dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per run (0: torch's default; default 1 on CPU, "
        "where a busy shared machine makes OpenMP threads spin on each other "
        "and time vary several-fold)",
    )
    parser.add_argument(
        "--local-limit-gb", type=float, default=8.0, help="skip local runs whose estimated peak exceeds this (CPU)"
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.threads is None:
        args.threads = 0 if args.device == "cuda" else 1
    return args


def _print_summary(runs: dict[tuple[str, int], list[dict]], tokens_list: list[int]) -> None:
    for tokens in tokens_list:
        medians = {}
        for variant in VARIANTS:
            measured = runs.get((variant, tokens))
            if not measured:
                continue
            medians[variant] = {
                key: statistics.median(r[key] for r in measured) for key in ("peak_bytes", "wall_s", "cpu_s")
            }
            median = medians[variant]
            note = "" if all(r["exact_peak"] for r in measured) else " (ru_maxrss upper bound)"
            print(
                f"  median s={tokens:6d} {variant:5s} peak {median['peak_bytes'] / MIB:9.1f} MiB"
                f"{note}   wall {median['wall_s']:7.2f} s   cpu {median['cpu_s']:7.2f} s"
            )
        if len(medians) == 2:
            ratio = {key: medians["sdpa"][key] / medians["local"][key] for key in medians["sdpa"]}
            print(
                f"  ratio  s={tokens:6d} sdpa / local: peak memory {ratio['peak_bytes']:.3f}x   "
                f"wall {ratio['wall_s']:.3f}x   cpu {ratio['cpu_s']:.3f}x   "
                "(targets at 8K: <= 0.1x memory, <= 1.0x time)",
                flush=True,
            )


def main(argv: list[str]) -> None:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.tokens[0], args.device, args.dtype, args.threads)))
        return
    import torch

    threads = args.threads or torch.get_num_threads()
    print(
        f"forward + backward of one [1, s] sequence, {HF_CONFIG['num_hidden_layers']} layers, "
        f"{HF_CONFIG['num_attention_heads']} query / {HF_CONFIG['num_key_value_heads']} kv heads "
        f"of {HF_CONFIG['head_dim']}, {args.dtype} on {args.device}, torch {torch.__version__}, "
        f"{threads} threads, median of {args.repeats} fresh processes",
        flush=True,
    )
    print(f"  load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    plan = []
    for tokens in args.tokens:
        for variant in VARIANTS:
            estimate = local_bytes_estimate(tokens, 4 if args.dtype == "float32" else 2)
            if variant == "local" and args.device == "cpu" and estimate > args.local_limit_gb * 2**30:
                print(
                    f"  skip local at s={tokens}: needs ~{estimate / 2**30:.1f} GiB "
                    f"(> --local-limit-gb {args.local_limit_gb})",
                    flush=True,
                )
                continue
            plan.append((variant, tokens))
    runs: dict[tuple[str, int], list[dict]] = {}
    start = time.perf_counter()
    # Rounds interleave the variants, so that load from other processes on a shared machine hits
    # every variant alike.
    for round_index in range(args.repeats):
        for variant, tokens in plan:
            run = _run_in_subprocess(variant, tokens, args)
            runs.setdefault((variant, tokens), []).append(run)
            print(
                f"  [{time.perf_counter() - start:6.0f} s] round {round_index + 1} s={tokens:6d} "
                f"{variant:5s} wall {run['wall_s']:7.2f} s  cpu {run['cpu_s']:7.2f} s  "
                f"peak {run['peak_bytes'] / MIB:9.1f} MiB",
                flush=True,
            )
    print(
        f"  load average at end: {os.getloadavg()[0]:.1f}  (wall times are only comparable on "
        "an otherwise idle machine)"
    )
    _print_summary(runs, args.tokens)


if __name__ == "__main__":
    main(sys.argv[1:])
