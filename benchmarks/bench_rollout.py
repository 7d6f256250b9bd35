"""Rollout throughput: the Megatron-native engine vs `transformers` generate, and decode cost vs length.

One process, one tiny random Qwen3 (saved with ``save_pretrained``, loaded into Megatron with
`load_hf_weights`, TP=1), one batch of prompts of mixed lengths. Both sides sample at temperature 1
with no truncation (the training setting) and generate exactly the requested number of tokens (no
EOS), in fp32 on the CPU with the same number of threads:

* throughput: generated tokens per second of a whole ``generate`` call (prefill included) at
  response length L (and 4L), for this engine and for `transformers` ``generate`` with its KV cache
  (``DynamicCache``, left-padded prompts). Target: engine / transformers >= 1.0. Timed both by
  wall-clock and by this process's CPU time: on a shared machine wall-clock also counts the time
  other processes hold the cores, CPU time only the work itself (equal when idle, one thread).
* the bare models: a prefill and L one-token forwards through megatron-core's GPTModel with its
  StaticInferenceContext, and through the `transformers` model with its DynamicCache, without
  either engine, to tell the engine's own cost apart from the model forward's.
* decode cost vs length: the engine's per-token decode time (its decode seconds / decode steps) at
  L and at 4L. With a KV cache each step costs one token's forward plus attention over the cache,
  so 4L should cost about the same per token; recomputing the prefix would make it ~4x. Target:
  ratio <= 1.5. The whole-call per-token times of both engines at L and 4L are printed beside it.

Each figure is the median of ``--repeats`` timed rounds after one warm-up round; within a round
the runs alternate, so that load from other processes on a shared machine hits both engines alike.

On a GPU (``--device cuda``, the default where CUDA is available) the same comparison runs there,
timed by wall-clock after a device synchronisation (CPU time says nothing about GPU work); pass
``--dtype bfloat16`` and a real model shape (e.g. Qwen3-0.6B's: ``--hidden 1024 --layers 28 --heads
16 --kv-heads 8 --head-dim 128 --ffn 3072 --vocab 151936``) for figures that mean something there.

    .venv/bin/python benchmarks/bench_rollout.py [--hidden 512] [--layers 4] [--vocab 1000]
        [--batch 8] [--length 64] [--repeats 5] [--threads 1] [--device auto] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _interleaved_medians(runs: dict[str, Callable[[int], None]], repeats: int,
                         synchronize: Callable[[], None] = lambda: None
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
    return ({name: statistics.median(v) for name, v in wall.items()},
            {name: statistics.median(v) for name, v in cpu.items()})


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--heads", type=int, default=0, help="attention heads (default hidden / 64)")
    parser.add_argument("--kv-heads", type=int, default=0, help="key-value heads (default heads / 2)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=0, help="MLP hidden size (default 4 x hidden)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64, help="response length L (also timed at 4L)")
    parser.add_argument("--prompt-length", type=int, default=16, help="shortest prompt length")
    parser.add_argument("--prompt-spread", type=int, default=8,
                        help="prompt i has prompt-length + i %% spread tokens (1: all equal)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both engines")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the GPU where CUDA is available, else the CPU")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameter dtype of both models (bfloat16 needs a GPU to be fast)")
    parser.add_argument("--engine", choices=("megatron", "vllm"), default="megatron",
                        help="vllm: compare vLLM with the native engine and transformers, and time its "
                             "weight sync (see vllm_main)")
    parser.add_argument("--sync-only", action="store_true", help=argparse.SUPPRESS)  # vllm_main's child runs
    return parser.parse_args(argv)


def _qwen3_config(args: argparse.Namespace, max_positions: int):
    """The benchmark's random Qwen3 shape from the command line (untied embeddings)."""
    from transformers import Qwen3Config

    heads = args.heads or max(1, args.hidden // 64)
    return Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn or 4 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=heads,
                       num_key_value_heads=args.kv_heads or max(1, heads // 2), head_dim=args.head_dim,
                       max_position_embeddings=max_positions, tie_word_embeddings=False)


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


def main(argv: list[str]) -> None:
    args = _parse(argv)
    if args.engine == "vllm":
        vllm_main(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if args.device == "cpu":
        os.environ["GOPD_FORCE_CPU"] = "1"  # megatron_gopd.platform reads it on first use
    os.environ.setdefault("MASTER_PORT", str(_free_port()))  # a world of one; avoid a busy default port
    torch.set_num_threads(args.threads)

    from megatron_gopd import platform
    from megatron_gopd.models.builder import torch_dtype
    from megatron_gopd.rollout import MegatronRolloutEngine, SamplingParams

    platform.init_distributed()
    platform.init_model_parallel(tp=1, pp=1)
    device = platform.device()
    on_gpu = device.type == "cuda"
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    if on_gpu:  # fp32 means fp32 on both sides: no TF32 shortcuts in one of them
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    config = _qwen3_config(args, max_positions=args.prompt_length + args.prompt_spread + 4 * args.length)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as hf_dir:
        hf_model, arch, model = _same_weights(config, hf_dir, args.dtype)
    hf_model = hf_model.to(device=device, dtype=torch_dtype(args.dtype))
    engine = MegatronRolloutEngine(model, arch)  # no EOS: every sample runs to its length

    generator = torch.Generator().manual_seed(1)
    lengths = [args.prompt_length + i % args.prompt_spread for i in range(args.batch)]
    prompts = [torch.randint(0, args.vocab, (n,), generator=generator).tolist() for n in lengths]
    # transformers: left-padded batch with an attention mask (it derives positions from the mask).
    width = max(lengths)
    hf_input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)  # [b, width]
    hf_attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

    def engine_run(new_tokens: int) -> Callable[[int], None]:
        def run(repeat: int) -> None:
            batch = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=new_tokens,
                                                            seed=repeat + 1))
            assert batch.num_tokens == args.batch * new_tokens
            decode_per_token[new_tokens].append(engine.last_stats.decode_seconds / engine.last_stats.decode_steps)
        return run

    def hf_run(new_tokens: int) -> Callable[[int], None]:
        def run(repeat: int) -> None:
            torch.manual_seed(repeat + 1)
            with torch.no_grad():
                out = hf_model.generate(hf_input_ids, attention_mask=hf_attention_mask, do_sample=True,
                                        temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                                        use_cache=True)
            assert out.shape == (args.batch, width + new_tokens)
        return run

    # The bare models, no engine: a prefill then L one-token forwards with each library's own KV
    # cache, so that the engine's own cost can be told apart from the model forward's.
    equal_prompts = torch.tensor([p[:min(lengths)] for p in prompts], device=device)  # [b, shortest prompt]

    def megatron_forwards(repeat: int) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(args.batch, min(lengths) + args.length)
        step = equal_prompts[:, -1:]  # [b, 1]
        model.eval()
        # as the engine runs it: without the CPU layer's per-call device rewriting
        with torch.inference_mode(), platform.device_rewrites_paused():
            model(equal_prompts, torch.arange(min(lengths), device=device).expand(args.batch, -1), None,
                  inference_context=context, runtime_gather_output=True)
            for position in range(min(lengths), min(lengths) + args.length - 1):
                context.sequence_len_offset = position
                model(step, torch.full((args.batch, 1), position, device=device), None,
                      inference_context=context, runtime_gather_output=True)

    def hf_forwards(repeat: int) -> None:
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
        step = equal_prompts[:, -1:]
        with torch.inference_mode():
            hf_model(equal_prompts, past_key_values=cache, use_cache=True)
            for position in range(min(lengths), min(lengths) + args.length - 1):
                hf_model(step, past_key_values=cache, use_cache=True,
                         position_ids=torch.full((args.batch, 1), position, device=device))

    short, long = args.length, 4 * args.length
    decode_per_token: dict[int, list[float]] = {short: [], long: []}
    wall, cpu = _interleaved_medians({f"engine{n}": engine_run(n) for n in (short, long)}
                                     | {f"hf{n}": hf_run(n) for n in (short, long)}
                                     | {"megatron_forwards": megatron_forwards, "hf_forwards": hf_forwards},
                                     args.repeats, synchronize)
    decode_ms = {n: 1e3 * statistics.median(decode_per_token[n][1:]) for n in (short, long)}  # skip warm-up
    # CPU time of a GPU run is the host's launching and waiting: only wall-clock means anything there.
    clocks = (("wall", wall),) if on_gpu else (("wall", wall), ("cpu", cpu))
    bare_clock, bare = clocks[-1]
    where = (f"{torch.cuda.get_device_name(device)}" if on_gpu
             else f"CPU, {args.threads} thread(s)")

    print(f"model: Qwen3 hidden {args.hidden}, {args.layers} layers, {heads}/{kv_heads} heads, vocab {args.vocab}, "
          f"{args.dtype}; batch {args.batch}, prompts {min(lengths)}-{max(lengths)} tokens, L = {short}; "
          f"{where}; median of {args.repeats} rounds")
    print()
    print(f"{'':40}{'L = ' + str(short):>12}{'4L = ' + str(long):>12}")
    for clock, seconds in clocks:
        for who, label in (("engine", "engine"), ("hf", "transformers generate")):
            print(f"{label + ' tokens/s (' + clock + ')':40}"
                  + "".join(f"{args.batch * n / seconds[f'{who}{n}']:12.1f}" for n in (short, long)))
    print(f"{'engine ms / decode step (wall)':40}{decode_ms[short]:12.3f}{decode_ms[long]:12.3f}")
    print(f"bare model forwards at L (no engine, {bare_clock} ms per forward): megatron-core GPTModel + "
          f"StaticInferenceContext {1e3 * bare['megatron_forwards'] / short:.2f}, transformers Qwen3 + "
          f"DynamicCache {1e3 * bare['hf_forwards'] / short:.2f}")
    print(f"engine {bare_clock} ms per generated step at L (whole call / L): {1e3 * bare[f'engine{short}'] / short:.2f}")
    print()
    for clock, seconds in clocks:
        for n in (short, long):
            ratio = seconds[f"hf{n}"] / seconds[f"engine{n}"]
            print(f"throughput engine / transformers at {'L ' if n == short else '4L'} ({clock}): {ratio:5.2f}x"
                  + ("   (target >= 1.0: " + ("met)" if ratio >= 1.0 else "NOT met)") if n == short else ""))
    growth = decode_ms[long] / decode_ms[short]
    print(f"engine per-token decode time 4L / L (wall):        {growth:5.2f}    (target <= 1.5: "
          f"{'met' if growth <= 1.5 else 'NOT met'})")
    for who, label in (("engine", "engine"), ("hf", "transformers")):
        per_token = {n: bare[f"{who}{n}"] / n for n in (short, long)}
        print(f"{label + ' per-token time of a call 4L / L (' + bare_clock + '):':51}"
              f"{per_token[long] / per_token[short]:5.2f}")
    platform.shutdown_distributed()


# ----------------------------------------------------------------------------------------------
# --engine vllm


WEIGHT_SYNC_SHAPES = {
    # the vLLM tests' tiny Qwen3 (head_dim 32: vLLM's CPU attention has no kernel for 16)
    "tiny": ["--hidden", "64", "--layers", "4", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
                           "--ffn", "128", "--vocab", "130"],
    "~100M params": ["--hidden", "768", "--layers", "8", "--heads", "12", "--kv-heads", "4", "--head-dim", "64",
                     "--ffn", "2048", "--vocab", "32000"],
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
        kv_gb = max(0.0625, 4 * args.batch * arch.num_layers * arch.num_query_groups * arch.kv_channels
                    * config.max_position_embeddings * 2 / 1024**3)
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
            batch = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=args.length,
                                                            seed=repeat + 1))
            assert batch.num_tokens == args.batch * args.length
        return run

    def hf_run(repeat: int) -> None:
        torch.manual_seed(repeat + 1)
        with torch.no_grad():
            hf_model.generate(hf_input_ids, attention_mask=hf_attention_mask, do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, max_new_tokens=args.length, min_new_tokens=args.length,
                              eos_token_id=None, pad_token_id=0, use_cache=True)

    wall, cpu = _interleaved_medians({"vllm": engine_run(vllm_engine), "megatron": engine_run(native),
                                      "transformers": hf_run}, args.repeats)
    vllm_engine.close()
    print(f"model: Qwen3 hidden {args.hidden}, {args.layers} layers, head_dim {args.head_dim}, vocab {args.vocab}, "
          f"{params / 1e6:.1f}M params, {args.dtype}; batch {args.batch}, prompts {min(lengths)}-{width} tokens, "
          f"L = {args.length}; CPU, {args.threads} thread(s); median of {args.repeats} rounds")
    for clock, seconds in (("wall", wall), ("cpu", cpu)):
        print(f"tokens/s ({clock}): " + ", ".join(f"{name} {args.batch * args.length / seconds[name]:.1f}"
                                                  for name in ("vllm", "megatron", "transformers"))
              + f"; vllm / megatron {seconds['megatron'] / seconds['vllm']:.2f}x, vllm / transformers "
              f"{seconds['transformers'] / seconds['vllm']:.2f}x")
    print(f"weight sync, this model: {sync_median:.4f} s (median of {args.repeats})")
    platform.shutdown_distributed()
    for name, shape in WEIGHT_SYNC_SHAPES.items():
        child = [sys.executable, __file__, "--engine", "vllm", "--sync-only", "--repeats", str(args.repeats),
                 "--threads", str(args.threads), *shape]
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
