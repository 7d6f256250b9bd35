"""Rollout throughput: the fast and the Megatron engines vs `transformers` generate; slots and lengths.

One process, one tiny random Qwen3 (saved with ``save_pretrained``, loaded into Megatron with
`load_hf_weights`, TP=1), one batch of prompts of mixed lengths. Every side samples at temperature 1
with no truncation (the training setting) and generates exactly the requested number of tokens (no
EOS), on the same weights, in the same dtype, with the same number of threads.

``--lengths fixed`` (default): every sample generates L tokens (and, timed separately, 4L).

* throughput: generated tokens per second of a whole ``generate`` call (prefill included) at L and
  4L, for the engines chosen with ``--engine fast|megatron|both`` and for `transformers` ``generate``
  with its KV cache (``DynamicCache``, left-padded prompts). Targets: fast / transformers >= 1.5
  (CPU tiny model); the Megatron engine's was >= 1.0. Timed by wall-clock and by this process's CPU
  time: on a shared machine wall-clock also counts the time other processes hold the cores, CPU
  time only the work itself (equal when idle, one thread).
* decode cost vs length: each engine's per-token decode time (decode seconds / decode steps) at L
  and 4L. Target for the fast engine: 4L / L <= 1.3 (the Megatron engine's was <= 1.5).
* the bare models (``--engine`` megatron or both): a prefill and L one-token forwards through
  megatron-core's GPTModel with its StaticInferenceContext and through the `transformers` model
  with its DynamicCache, to tell an engine's own cost apart from the model forward's.
* memory: the fast engine's KV slots, and peak device memory per engine on CUDA (process peak
  RSS on CPU, which no single engine owns).

``--lengths heavy-tailed``: ``--samples`` prompts whose response lengths are log-normal (mean L,
``--sigma``, at most 4L), EOS ignored so that lengths are exactly controlled, on ``--slots`` KV
slots: the fast engine with continuous batching (a finished sample's slot is refilled at once)
against static batching of the same slot count (a new wave only when every slot is free). Prints
tokens/s of both, their mean slot occupancy while samples were queued, and the ratio. Targets:
continuous / static >= 1.5, occupancy >= 85%.

Each figure is the median of ``--repeats`` timed rounds after one warm-up round; within a round
the runs alternate, so that load from other processes on a shared machine hits all of them alike.

On a GPU (``--device cuda``, the default where CUDA is available) the same comparisons run there,
timed by wall-clock after a device synchronisation; pass ``--dtype bfloat16`` and a real shape (e.g.
Qwen3-0.6B's: ``--hidden 1024 --layers 28 --heads 16 --kv-heads 8 --head-dim 128 --ffn 3072 --vocab
151936``) for figures that mean something there.

    .venv/bin/python benchmarks/bench_rollout.py [--engine both] [--lengths fixed] [--hidden 512]
        [--layers 4] [--vocab 1000] [--batch 8] [--length 64] [--repeats 5] [--threads 1]
        [--device auto] [--dtype float32] [--slots 8] [--samples 64] [--sigma 1.0]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _interleaved_medians(
    runs: dict[str, Callable[[int], None]], repeats: int, synchronize: Callable[[], None] = lambda: None
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall-clock and CPU seconds of every ``run(repeat_index)`` over `repeats` rounds.

    One warm-up round first. The runs alternate within each round, so that load from other
    processes on a shared machine falls on all of them alike. CPU time (this process's user +
    system time) is what the work itself costs: with one thread it equals wall-clock on an idle
    machine, and unlike wall-clock it does not grow when other processes take the cores.
    `synchronize` waits for queued device work before each clock is read.
    """
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(-1, repeats):
        for name, run in runs.items():
            synchronize()
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            run(repeat)
            synchronize()
            if repeat >= 0:
                wall[name].append(time.perf_counter() - wall_start)
                cpu[name].append(time.process_time() - cpu_start)
        print(f"round {repeat + 2}/{repeats + 1} done" + (" (warm-up)" if repeat < 0 else ""), file=sys.stderr)
    return (
        {name: statistics.median(v) for name, v in wall.items()},
        {name: statistics.median(v) for name, v in cpu.items()},
    )


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--engine",
        choices=("fast", "megatron", "both", "vllm"),
        default="both",
        help="vllm: compare vLLM with the native engine and transformers, and time its weight sync (see vllm_main)",
    )
    parser.add_argument("--sync-only", action="store_true", help=argparse.SUPPRESS)  # vllm_main's child runs
    parser.add_argument("--lengths", choices=("fixed", "heavy-tailed"), default="fixed")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--heads", type=int, default=0, help="attention heads (default hidden / 64)")
    parser.add_argument("--kv-heads", type=int, default=0, help="key-value heads (default heads / 2)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=0, help="MLP hidden size (default 4 x hidden)")
    parser.add_argument("--batch", type=int, default=8, help="prompts of the fixed-length runs")
    parser.add_argument("--length", type=int, default=64, help="response length L (also timed at 4L)")
    parser.add_argument("--prompt-length", type=int, default=16, help="shortest prompt length")
    parser.add_argument(
        "--prompt-spread", type=int, default=8, help="prompt i has prompt-length + i %% spread tokens (1: all equal)"
    )
    parser.add_argument(
        "--slots", type=int, default=0, help="fast engine KV slots (default: --batch; heavy-tailed: --samples / 4)"
    )
    parser.add_argument("--samples", type=int, default=64, help="heavy-tailed: prompts (one sample each)")
    parser.add_argument("--sigma", type=float, default=1.0, help="heavy-tailed: log-normal sigma of the lengths")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every engine")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: the GPU where CUDA is available, else the CPU",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="parameter dtype of all models (bfloat16 needs a GPU to be fast)",
    )
    return parser.parse_args(argv)


@dataclasses.dataclass
class _Setup:
    """The models and the environment every run shares."""

    args: argparse.Namespace
    model: object
    hf_model: object
    hf_config: object
    arch: object
    device: torch.device
    synchronize: Callable[[], None]

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def _qwen3_config(args: argparse.Namespace, max_positions: int):
    """The benchmark's random Qwen3 shape from the command line (untied embeddings)."""
    from transformers import Qwen3Config

    heads = args.heads or max(1, args.hidden // 64)
    return Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn or 4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=args.kv_heads or max(1, heads // 2),
        head_dim=args.head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )


def _same_weights(config, hf_dir: str, dtype: str):
    """(transformers model, architecture, Megatron GPTModel at TP=1) with the same random weights,
    saved through `hf_dir`."""
    from transformers import Qwen3ForCausalLM

    from megatron_gopd.bridge import load_hf_weights
    from megatron_gopd.models import ModelArchitecture, ParallelLayout, build_gpt_model

    torch.manual_seed(0)
    hf_model = Qwen3ForCausalLM(config).eval()
    hf_model.save_pretrained(hf_dir)
    arch = ModelArchitecture.from_pretrained(hf_dir)
    model = build_gpt_model(arch, ParallelLayout(), dtype=dtype, perform_initialization=False)
    load_hf_weights(model, arch, hf_dir)
    return hf_model, arch, model


def _setup(args: argparse.Namespace) -> _Setup:
    """Start a world of one, build the tiny Qwen3 in `transformers` and in Megatron (same weights)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if args.device == "cpu":
        os.environ["GOPD_FORCE_CPU"] = "1"  # megatron_gopd.platform reads it on first use
    os.environ.setdefault("MASTER_PORT", str(_free_port()))  # a world of one; avoid a busy default port
    torch.set_num_threads(args.threads)

    from megatron_gopd import platform
    from megatron_gopd.models.builder import torch_dtype

    platform.init_distributed()
    platform.init_model_parallel(tp=1, pp=1)
    device = platform.device()
    if device.type == "cuda":  # fp32 means fp32 on every side: no TF32 shortcuts in one of them
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    config = _qwen3_config(args, max_positions=args.prompt_length + args.prompt_spread + 4 * args.length)
    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as hf_dir:
        hf_model, arch, model = _same_weights(config, hf_dir, args.dtype)
    hf_model = hf_model.to(device=device, dtype=torch_dtype(args.dtype))
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return _Setup(args, model, hf_model, config, arch, device, synchronize)


def _prompts(args: argparse.Namespace, count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = [args.prompt_length + i % args.prompt_spread for i in range(count)]
    return [torch.randint(0, args.vocab, (n,), generator=generator).tolist() for n in lengths]


def _peak_memory(setup: _Setup, run: Callable[[], None]) -> float:
    """Peak device memory (GB) during `run` on CUDA; NaN on CPU (no per-run figure there)."""
    if not setup.on_gpu:
        run()
        return float("nan")
    setup.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()
    setup.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


def _fixed_lengths(setup: _Setup) -> None:
    """Engines vs transformers generate at L and 4L, per-token decode cost, bare forwards, memory."""
    from megatron_gopd import platform
    from megatron_gopd.rollout import FastRolloutEngine, MegatronRolloutEngine, SamplingParams

    args, device, model = setup.args, setup.device, setup.model
    engines = {}
    if args.engine in ("fast", "both"):
        engines["fast"] = FastRolloutEngine(model, setup.arch, max_slots=args.slots or args.batch)
    if args.engine in ("megatron", "both"):
        engines["megatron"] = MegatronRolloutEngine(model, setup.arch)  # no EOS: every sample runs to its length
    prompts = _prompts(args, args.batch)
    lengths = [len(p) for p in prompts]
    # transformers: left-padded batch with an attention mask (it derives positions from the mask).
    width = max(lengths)
    hf_input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)  # [b, width]
    hf_attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    short, long = args.length, 4 * args.length
    decode_per_token: dict[str, list[float]] = {f"{e}{n}": [] for e in engines for n in (short, long)}

    def engine_run(name: str, new_tokens: int) -> Callable[[int], None]:
        def run(repeat: int) -> None:
            engine = engines[name]
            batch = engine.generate(
                prompts, SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=repeat + 1)
            )
            assert batch.num_tokens == args.batch * new_tokens
            decode_per_token[f"{name}{new_tokens}"].append(
                engine.last_stats.decode_seconds / engine.last_stats.decode_steps
            )

        return run

    def hf_run(new_tokens: int) -> Callable[[int], None]:
        def run(repeat: int) -> None:
            torch.manual_seed(repeat + 1)
            with torch.no_grad():
                out = setup.hf_model.generate(
                    hf_input_ids,
                    attention_mask=hf_attention_mask,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    eos_token_id=None,
                    pad_token_id=0,
                    use_cache=True,
                )
            assert out.shape == (args.batch, width + new_tokens)

        return run

    # The bare models, no engine: a prefill then L one-token forwards with each library's own KV
    # cache, so that an engine's own cost can be told apart from the model forward's.
    equal_prompts = torch.tensor([p[: min(lengths)] for p in prompts], device=device)  # [b, shortest prompt]

    def megatron_forwards(repeat: int) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(args.batch, min(lengths) + args.length)
        step = equal_prompts[:, -1:]  # [b, 1]
        model.eval()
        # as the engine runs it: without the CPU layer's per-call device rewriting
        with torch.inference_mode(), platform.device_rewrites_paused():
            model(
                equal_prompts,
                torch.arange(min(lengths), device=device).expand(args.batch, -1),
                None,
                inference_context=context,
                runtime_gather_output=True,
            )
            for position in range(min(lengths), min(lengths) + args.length - 1):
                context.sequence_len_offset = position
                model(
                    step,
                    torch.full((args.batch, 1), position, device=device),
                    None,
                    inference_context=context,
                    runtime_gather_output=True,
                )

    def hf_forwards(repeat: int) -> None:
        from transformers import DynamicCache

        cache = DynamicCache(config=setup.hf_config)
        step = equal_prompts[:, -1:]
        with torch.inference_mode():
            setup.hf_model(equal_prompts, past_key_values=cache, use_cache=True)
            for position in range(min(lengths), min(lengths) + args.length - 1):
                setup.hf_model(
                    step,
                    past_key_values=cache,
                    use_cache=True,
                    position_ids=torch.full((args.batch, 1), position, device=device),
                )

    # The floor under every engine: per decode step, one matmul of the batch's rows with each weight
    # matrix (every linear layer and the output layer; the embedding is a lookup). Nothing else: no
    # attention, norms, sampling or bookkeeping. At small batch these read every weight once per step.
    weights = [p.detach() for name, p in model.named_parameters() if p.dim() == 2 and "embedding" not in name]
    gemm_inputs = {w.shape[1]: torch.randn(args.batch, w.shape[1], device=device, dtype=w.dtype) for w in weights}

    def gemm_floor(new_tokens: int) -> Callable[[int], None]:
        def run(repeat: int) -> None:
            with torch.inference_mode():
                for _ in range(new_tokens):
                    for w in weights:
                        torch.nn.functional.linear(gemm_inputs[w.shape[1]], w)  # [b, in] -> [b, out]

        return run

    runs = {f"{e}{n}": engine_run(e, n) for e in engines for n in (short, long)}
    runs |= {f"hf{n}": hf_run(n) for n in (short, long)}
    runs |= {"floor": gemm_floor(short)}
    if "megatron" in engines:
        runs |= {"megatron_forwards": megatron_forwards, "hf_forwards": hf_forwards}
    wall, cpu = _interleaved_medians(runs, args.repeats, setup.synchronize)
    decode_ms = {k: 1e3 * statistics.median(v[1:]) for k, v in decode_per_token.items()}  # skip warm-up
    peaks = {name: _peak_memory(setup, lambda r=runs[f"{name}{short}"]: r(0)) for name in [*engines, "hf"]}
    # CPU time of a GPU run is the host's launching and waiting: only wall-clock means anything there.
    clocks = (("wall", wall),) if setup.on_gpu else (("wall", wall), ("cpu", cpu))
    bare_clock, bare = clocks[-1]
    where = torch.cuda.get_device_name(device) if setup.on_gpu else f"CPU, {args.threads} thread(s)"
    labels = {"fast": "fast engine", "megatron": "megatron engine", "hf": "transformers generate"}

    print(
        f"model: Qwen3 hidden {args.hidden}, {args.layers} layers, {setup.hf_config.num_attention_heads}/"
        f"{setup.hf_config.num_key_value_heads} heads, vocab {args.vocab}, {args.dtype}; batch {args.batch}, "
        f"prompts {min(lengths)}-{max(lengths)} tokens, L = {short}; {where}; median of {args.repeats} rounds"
    )
    print()
    print(f"{'':44}{'L = ' + str(short):>12}{'4L = ' + str(long):>12}")
    for clock, seconds in clocks:
        for who in [*engines, "hf"]:
            print(
                f"{labels[who] + ' tokens/s (' + clock + ')':44}"
                + "".join(f"{args.batch * n / seconds[f'{who}{n}']:12.1f}" for n in (short, long))
            )
    for who in engines:
        print(
            f"{labels[who] + ' ms / decode step (wall)':44}{decode_ms[f'{who}{short}']:12.3f}"
            f"{decode_ms[f'{who}{long}']:12.3f}"
        )
    if "megatron" in engines:
        print(
            f"bare model forwards at L (no engine, {bare_clock} ms per forward): megatron-core GPTModel + "
            f"StaticInferenceContext {1e3 * bare['megatron_forwards'] / short:.2f}, transformers Qwen3 + "
            f"DynamicCache {1e3 * bare['hf_forwards'] / short:.2f}"
        )
    floor_ms = 1e3 * bare["floor"] / short
    print(
        f"weight-GEMM floor ({bare_clock}): {floor_ms:.3f} ms per decode step (the batch's rows times every weight "
        "matrix, nothing else); per step of a whole call at L: "
        + ", ".join(f"{labels[who]} {1e3 * bare[f'{who}{short}'] / short / floor_ms:.2f}x" for who in [*engines, "hf"])
        + f" the floor. No engine can beat transformers generate by more than "
        f"{bare[f'hf{short}'] / bare['floor']:.2f}x here"
    )
    if "fast" in engines:
        stats = engines["fast"].last_stats
        print(
            f"fast engine: {stats.slots} KV slots x {stats.slot_tokens} tokens = {stats.kv_cache_bytes / 1e6:.1f} MB, "
            f"attention {stats.attention_backend}, {stats.cuda_graphs} CUDA graphs"
        )
    if setup.on_gpu:
        print(
            "peak device memory of one call at L (GB): " + ", ".join(f"{labels[who]} {peaks[who]:.3f}" for who in peaks)
        )
    else:
        print(
            f"process peak RSS so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB "
            "(all engines together; no per-engine figure on CPU)"
        )
    print()
    targets = {"fast": 1.5, "megatron": 1.0}
    for who in engines:
        for clock, seconds in clocks:
            for n in (short, long):
                ratio = seconds[f"hf{n}"] / seconds[f"{who}{n}"]
                verdict = (
                    f"   (target >= {targets[who]}: " + ("met)" if ratio >= targets[who] else "NOT met)")
                    if n == short
                    else ""
                )
                print(
                    f"throughput {labels[who]} / transformers at {'L ' if n == short else '4L'} ({clock}): "
                    f"{ratio:5.2f}x{verdict}"
                )
    growth_targets = {"fast": 1.3, "megatron": 1.5}
    for who in engines:
        growth = decode_ms[f"{who}{long}"] / decode_ms[f"{who}{short}"]
        print(
            f"{labels[who]} per-token decode time 4L / L (wall): {growth:5.2f}    (target <= "
            f"{growth_targets[who]}: {'met' if growth <= growth_targets[who] else 'NOT met'})"
        )
    for who in [*engines, "hf"]:
        per_token = {n: bare[f"{who}{n}"] / n for n in (short, long)}
        print(
            f"{labels[who] + ' per-token time of a call 4L / L (' + bare_clock + '):':58}"
            f"{per_token[long] / per_token[short]:5.2f}"
        )


def _heavy_tailed(setup: _Setup) -> None:
    """Continuous vs static batching of the fast engine on log-normal response lengths."""
    from megatron_gopd.rollout import FastRolloutEngine, SamplingParams

    args = setup.args
    slots = args.slots or max(1, args.samples // 4)
    prompts = _prompts(args, args.samples)
    rng = np.random.default_rng(0)
    # Log-normal with mean L: exp(N(log L - sigma^2 / 2, sigma)); at most 4L (the context).
    draws = rng.lognormal(np.log(args.length) - args.sigma**2 / 2, args.sigma, size=args.samples)
    limits = np.clip(np.round(draws), 1, 4 * args.length).astype(int).tolist()
    engines = {
        mode: FastRolloutEngine(setup.model, setup.arch, max_slots=slots, continuous_batching=mode == "continuous")
        for mode in ("continuous", "static")
    }
    stats: dict[str, list] = {mode: [] for mode in engines}

    def run_of(mode: str) -> Callable[[int], None]:
        def run(repeat: int) -> None:
            batch = engines[mode].generate(
                prompts,
                SamplingParams(temperature=1.0, max_new_tokens=4 * args.length, seed=repeat + 1),
                max_new_tokens_per_prompt=limits,
            )
            assert batch.response_lengths == limits  # no EOS: the lengths are exactly the drawn ones
            stats[mode].append(engines[mode].last_stats)

        return run

    wall, cpu = _interleaved_medians({mode: run_of(mode) for mode in engines}, args.repeats, setup.synchronize)
    clocks = (("wall", wall),) if setup.on_gpu else (("wall", wall), ("cpu", cpu))
    tokens = sum(limits)
    print(
        f"heavy-tailed: {args.samples} samples, response lengths log-normal mean {args.length} sigma {args.sigma} "
        f"(drawn: mean {np.mean(limits):.0f}, median {np.median(limits):.0f}, max {max(limits)}), {slots} slots, "
        f"{args.dtype}, {'GPU' if setup.on_gpu else f'CPU {args.threads} thread(s)'}; median of {args.repeats} rounds"
    )
    for mode in engines:
        last = stats[mode][-1]
        line = ", ".join(f"{tokens / seconds[mode]:.1f} tokens/s ({clock})" for clock, seconds in clocks)
        print(
            f"{mode + ' batching:':22}{line}; slot occupancy {100 * last.occupancy_while_queued:.1f}% while "
            f"queued, {100 * last.occupancy:.1f}% overall; {last.decode_steps} decode steps"
        )
    for clock, seconds in clocks:
        ratio = seconds["static"] / seconds["continuous"]
        print(f"continuous / static ({clock}): {ratio:5.2f}x   (target >= 1.5: {'met' if ratio >= 1.5 else 'NOT met'})")
    occupancy = stats["continuous"][-1].occupancy_while_queued
    print(
        f"continuous mean slot occupancy until the queue empties: {100 * occupancy:.1f}%   (target >= 85%: "
        f"{'met' if occupancy >= 0.85 else 'NOT met'})"
    )


def main(argv: list[str]) -> None:
    args = _parse(argv)
    if args.engine == "vllm":
        vllm_main(args)
        return
    setup = _setup(args)
    from megatron_gopd import platform

    if args.lengths == "fixed":
        _fixed_lengths(setup)
    else:
        if args.engine == "megatron":
            raise SystemExit(
                "--lengths heavy-tailed compares the fast engine's continuous and static batching; "
                "use --engine fast or both"
            )
        _heavy_tailed(setup)
    platform.shutdown_distributed()


# ----------------------------------------------------------------------------------------------
# --engine vllm


WEIGHT_SYNC_SHAPES = {
    # the vLLM tests' tiny Qwen3 (head_dim 32: vLLM's CPU attention has no kernel for 16)
    "tiny": [
        "--hidden",
        "64",
        "--layers",
        "4",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "32",
        "--ffn",
        "128",
        "--vocab",
        "130",
    ],
    "~100M params": [
        "--hidden",
        "768",
        "--layers",
        "8",
        "--heads",
        "12",
        "--kv-heads",
        "4",
        "--head-dim",
        "64",
        "--ffn",
        "2048",
        "--vocab",
        "32000",
    ],
}


def vllm_main(args: argparse.Namespace) -> None:
    """``--engine vllm``: vLLM vs the native engine vs transformers generate, and the weight sync.

    Tokens/s of the three on the same weights and prompts (temperature 1, no truncation, exactly L
    tokens each, interleaved rounds as above), then the time of `VLLMRolloutEngine.sync_weights`
    (bridge export -> vLLM reload_weights -> prefix-cache reset) for this shape and, each in a child
    process (one vLLM engine per process), for `WEIGHT_SYNC_SHAPES` (target: < 0.1 s for the tiny
    model on CPU). ``--sync-only`` (the children) times only the sync.
    """
    if args.device == "cpu":
        os.environ["GOPD_FORCE_CPU"] = "1"
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    torch.set_num_threads(args.threads)
    from megatron_gopd import platform
    from megatron_gopd.rollout import MegatronRolloutEngine, SamplingParams, VLLMRolloutEngine

    platform.init_distributed()
    platform.init_model_parallel(tp=1, pp=1)
    config = _qwen3_config(args, max_positions=args.prompt_length + args.prompt_spread + args.length)
    with tempfile.TemporaryDirectory(prefix="bench_rollout_vllm_") as hf_dir:
        hf_model, arch, model = _same_weights(config, hf_dir, args.dtype)
        kv_gb = max(
            0.0625,
            4
            * args.batch
            * arch.num_layers
            * arch.num_query_groups
            * arch.kv_channels
            * config.max_position_embeddings
            * 2
            / 1024**3,
        )
        vllm_engine = VLLMRolloutEngine(model, arch, hf_dir, kv_cache_gb=kv_gb, seed=0)
    params = sum(p.numel() for p in model.parameters())
    sync_seconds = []
    for _ in range(args.repeats + 1):
        vllm_engine.sync_weights()
        sync_seconds.append(vllm_engine.last_sync_seconds)
    sync_median = statistics.median(sync_seconds[1:])  # the first sync warms vLLM's reload path
    if args.sync_only:
        print(f"SYNC {params} {sync_median:.4f}")
        vllm_engine.close()
        return

    native = MegatronRolloutEngine(model, arch)
    generator = torch.Generator().manual_seed(1)
    lengths = [args.prompt_length + i % args.prompt_spread for i in range(args.batch)]
    prompts = [torch.randint(0, args.vocab, (n,), generator=generator).tolist() for n in lengths]
    width = max(lengths)
    hf_input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # [b, width], left-padded
    hf_attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def engine_run(engine) -> Callable[[int], None]:
        def run(repeat: int) -> None:
            batch = engine.generate(
                prompts, SamplingParams(temperature=1.0, max_new_tokens=args.length, seed=repeat + 1)
            )
            assert batch.num_tokens == args.batch * args.length

        return run

    def hf_run(repeat: int) -> None:
        torch.manual_seed(repeat + 1)
        with torch.no_grad():
            hf_model.generate(
                hf_input_ids,
                attention_mask=hf_attention_mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.length,
                min_new_tokens=args.length,
                eos_token_id=None,
                pad_token_id=0,
                use_cache=True,
            )

    wall, cpu = _interleaved_medians(
        {"vllm": engine_run(vllm_engine), "megatron": engine_run(native), "transformers": hf_run}, args.repeats
    )
    vllm_engine.close()
    print(
        f"model: Qwen3 hidden {args.hidden}, {args.layers} layers, head_dim {args.head_dim}, vocab {args.vocab}, "
        f"{params / 1e6:.1f}M params, {args.dtype}; batch {args.batch}, prompts {min(lengths)}-{width} tokens, "
        f"L = {args.length}; CPU, {args.threads} thread(s); median of {args.repeats} rounds"
    )
    for clock, seconds in (("wall", wall), ("cpu", cpu)):
        print(
            f"tokens/s ({clock}): "
            + ", ".join(
                f"{name} {args.batch * args.length / seconds[name]:.1f}"
                for name in ("vllm", "megatron", "transformers")
            )
            + f"; vllm / megatron {seconds['megatron'] / seconds['vllm']:.2f}x, vllm / transformers "
            f"{seconds['transformers'] / seconds['vllm']:.2f}x"
        )
    print(f"weight sync, this model: {sync_median:.4f} s (median of {args.repeats})")
    platform.shutdown_distributed()
    for name, shape in WEIGHT_SYNC_SHAPES.items():
        child = [
            sys.executable,
            __file__,
            "--engine",
            "vllm",
            "--sync-only",
            "--repeats",
            str(args.repeats),
            "--threads",
            str(args.threads),
            *shape,
        ]
        lines = [line for line in _run_child(child).splitlines() if line.startswith("SYNC ")]
        _, child_params, seconds = lines[-1].split()
        target = "   (target < 0.1 s: " + ("met)" if float(seconds) < 0.1 else "NOT met)") if "tiny" in name else ""
        print(f"weight sync, {name} ({int(child_params) / 1e6:.1f}M): {float(seconds):.4f} s{target}")


def _run_child(cmd: list[str]) -> str:
    import subprocess

    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MASTER_PORT": str(_free_port())})
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


if __name__ == "__main__":
    main(sys.argv[1:])
