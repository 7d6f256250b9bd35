"""GPU check of the rollout engines: versions, bf16 correctness, throughput, bandwidth, memory -> JSON.

One run (under ~8 minutes on one H100 / H200) that writes ``gpu_check.json`` to the directory it is
given, phase by phase (a phase that fails or runs out of time is recorded as such; the rest go on):

* ``environment``: torch / transformers / megatron-core versions, the device, and which attention
  entry points exist (torch's FlashAttention varlen entry and its signature, flash-attn, flashinfer).
* ``copy_bandwidth``: the card's measured device-to-device copy bandwidth (GB/s, read + write).
* per model shape (Qwen3-0.6B and Qwen3-1.7B, random weights built locally from the public configs;
  ``--tiny``: one tiny shape, for exercising the script on CPU):
  - ``correctness``: the fast engine's bf16 log-probs of its own samples against one full Megatron
    forward of prompt + response (mean / p99 absolute difference; issue targets 5e-3 / 5e-2), and
    greedy token agreement with the Megatron engine.
  - ``throughput``: tokens/s of the fast engine, the Megatron engine (fewer tokens: it is slow) and
    `transformers` ``generate`` on the same weights, B samples x N new tokens (0.6B: 64 x 1024).
  - ``long_context`` (1.7B): decode tokens/s of 64 slots at ~4K context against the bandwidth bound
    ``B * BW / (W + B * L * kv_bytes_per_token)`` with the measured copy bandwidth, the achieved
    GB/s, and the decode host time per step as a fraction of the step (target <= 10%).
  - ``peak_memory_gb`` of every phase.

    python benchmarks/gpu_check.py --out DIR            # on a GPU
    python benchmarks/gpu_check.py --out DIR --tiny     # tiny shapes, runs on CPU too
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# Public Hugging Face configs (Qwen/Qwen3-0.6B, Qwen/Qwen3-1.7B), the fields the check needs.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
    ),
    "qwen3-1.7b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
    ),
}
TINY_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=1000,
    tie_word_embeddings=True,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    max_position_embeddings=1024,
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Report:
    """The JSON report, rewritten after every phase so that a killed run still leaves its figures."""

    def __init__(self, out_dir: Path, deadline: float, device: torch.device) -> None:
        self.path, self.deadline, self.device = out_dir / "gpu_check.json", deadline, device
        self.data: dict[str, Any] = {}

    def phase(self, where: dict, name: str, fn: Callable[[], Any]) -> None:
        """Run one phase into ``where[name]`` with its wall time and peak memory; never raises."""
        if time.monotonic() > self.deadline:
            where[name] = {"skipped": "out of time"}
            self._write()
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            result = fn()
        except Exception:  # noqa: BLE001 - record it and go on with the next phase
            result = {"error": traceback.format_exc(limit=6)}
            print(f"{name} failed:\n{result['error']}", file=sys.stderr)
        if not isinstance(result, dict):
            result = {"value": result}
        result["seconds"] = round(time.perf_counter() - started, 2)
        if self.device.type == "cuda":
            result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        where[name] = result
        print(f"{name}: {json.dumps(result)[:300]}", file=sys.stderr)
        self._write()

    def _write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2, default=str))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _environment(device: torch.device) -> dict:
    import megatron.core
    import transformers

    from megatron_gopd.rollout.fast_attention import attention_entry_points

    return dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        megatron_core=getattr(megatron.core, "__version__", "?"),
        cuda=torch.version.cuda,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        attention=attention_entry_points(),
    )


def _copy_bandwidth(device: torch.device, gigabytes: float) -> dict:
    """Device copy bandwidth, counting the bytes read and written."""
    source = torch.empty(int(gigabytes * 1e9) // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    _synchronize(device)
    started, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        target.copy_(source)
    _synchronize(device)
    seconds = (time.perf_counter() - started) / repeats
    return {"gb_per_s": round(2 * source.numel() * 4 / seconds / 1e9, 1), "bytes": source.numel() * 4}


def _kernels(device: torch.device, dtype: torch.dtype) -> dict:
    """The fast attention kernels against their oracles, in `dtype` on `device` (largest abs error)."""
    from megatron_gopd.rollout.fast_attention import (
        grouped_decode_attention,
        packed_prefill_attention,
        reference_decode_attention,
        reference_prefill_attention,
    )

    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(64, 16, 128, device=device, dtype=dtype, generator=generator)
    keys, values = torch.randn(2, 64, 8, 1024, 128, device=device, dtype=dtype, generator=generator)
    lengths = torch.randint(1, 1025, (64,), device=device, generator=generator)
    decode = (
        (
            grouped_decode_attention(q, keys, values, lengths, 128**-0.5).float()
            - reference_decode_attention(q, keys, values, lengths, 128**-0.5).float()
        )
        .abs()
        .max()
        .item()
    )
    cu_seqlens = [0, 100, 357, 1000]
    packed_q = torch.randn(1000, 16, 128, device=device, dtype=dtype, generator=generator)
    packed_k, packed_v = torch.randn(2, 1000, 8, 128, device=device, dtype=dtype, generator=generator)
    prefill = (
        packed_prefill_attention(packed_q, packed_k, packed_v, cu_seqlens, 128**-0.5).float()
        - reference_prefill_attention(packed_q, packed_k, packed_v, cu_seqlens, 128**-0.5).float()
    )
    from megatron_gopd.rollout import fast_attention

    return {
        "decode_max_abs_error": decode,
        "prefill_max_abs_error": prefill.abs().max().item(),
        "prefill_used_varlen": fast_attention._VARLEN_PREFILL is True,
    }


def _build(shape: dict, dtype: str, device: torch.device):
    """A random Qwen3 of `shape` in transformers and the same weights in Megatron (TP=1)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_gopd.bridge import load_hf_weights
    from megatron_gopd.models import ModelArchitecture, ParallelLayout, build_gpt_model
    from megatron_gopd.models.builder import torch_dtype

    torch.manual_seed(0)
    config = Qwen3Config(**shape)
    hf_model = Qwen3ForCausalLM(config).to(torch_dtype(dtype)).eval()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as hf_dir:
        hf_model.save_pretrained(hf_dir)
        arch = ModelArchitecture.from_pretrained(hf_dir)
        model = build_gpt_model(arch, ParallelLayout(), dtype=dtype, perform_initialization=False)
        load_hf_weights(model, arch, hf_dir)
    return hf_model.to(device), model.eval(), arch


def _prompts(count: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length + i % 8,), generator=generator).tolist() for i in range(count)]


def _correctness(model, arch, device: torch.device, samples: int, new_tokens: int) -> dict:
    """Fast-engine log-probs of its own samples vs one full Megatron forward; greedy agreement."""
    from megatron_gopd.rollout import FastRolloutEngine, MegatronRolloutEngine, SamplingParams

    fast = FastRolloutEngine(model, arch)
    prompts = _prompts(samples, 32, arch.vocab_size)
    batch = fast.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=3))
    gaps = []
    with torch.inference_mode():
        for prompt, sample in zip(prompts, batch):
            tokens = torch.tensor([prompt + sample.token_ids], device=device)  # [1, s]
            logits = model(tokens, torch.arange(tokens.shape[1], device=device)[None, :], None)  # [1, s, V_padded]
            scored = (
                logits[0, len(prompt) - 1 : -1, : arch.vocab_size].float().log_softmax(-1)
            )  # predicts each response token
            reference = scored.gather(1, torch.tensor(sample.token_ids, device=device)[:, None]).squeeze(1)
            gaps.append((reference - torch.tensor(sample.logprobs, device=device)).abs())
    gaps = torch.cat(gaps).float()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    fast_greedy = fast.generate(prompts, greedy)
    reference_greedy = MegatronRolloutEngine(model, arch).generate(prompts, greedy)
    fast.release()
    agree = [
        sum(a == b for a, b in zip(x.token_ids, y.token_ids)) / len(y.token_ids)
        for x, y in zip(fast_greedy, reference_greedy)
    ]
    return {
        "logprob_gap_mean": gaps.mean().item(),
        "logprob_gap_p99": gaps.quantile(0.99).item(),
        "targets": {"mean": 5e-3, "p99": 5e-2},
        "tokens": gaps.numel(),
        "greedy_token_agreement_with_megatron_engine": sum(agree) / len(agree),
    }


def _throughput(
    hf_model, model, arch, device: torch.device, samples: int, new_tokens: int, megatron_new_tokens: int
) -> dict:
    """Tokens/s of a whole generate call (one warm-up call first) for each engine and transformers."""
    from megatron_gopd.rollout import FastRolloutEngine, MegatronRolloutEngine, SamplingParams

    prompts = _prompts(samples, 32, arch.vocab_size)
    width = max(map(len, prompts))
    hf_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    hf_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    fast = FastRolloutEngine(model, arch, max_slots=samples)
    runs = {
        "fast": (new_tokens, lambda n: fast.generate(prompts, SamplingParams(max_new_tokens=n, seed=1))),
        "megatron": (
            megatron_new_tokens,
            lambda n: MegatronRolloutEngine(model, arch).generate(prompts, SamplingParams(max_new_tokens=n, seed=1)),
        ),
        "transformers": (
            new_tokens,
            lambda n: hf_model.generate(
                hf_ids,
                attention_mask=hf_mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=n,
                min_new_tokens=n,
                eos_token_id=None,
                pad_token_id=0,
            ),
        ),
    }
    out: dict[str, Any] = {"samples": samples}
    for name, (tokens, run) in runs.items():
        with torch.inference_mode():
            run(8)  # warm-up: kernels, allocator, CUDA graphs of the small buckets
            _synchronize(device)
            started = time.perf_counter()
            run(tokens)
            _synchronize(device)
        seconds = time.perf_counter() - started
        out[name] = {
            "new_tokens": tokens,
            "tokens_per_s": round(samples * tokens / seconds, 1),
            "seconds": round(seconds, 2),
        }
    stats = fast.last_stats
    out["fast"].update(
        cuda_graphs=stats.cuda_graphs,
        slots=stats.slots,
        decode_host_fraction=round(stats.decode_host_seconds / max(stats.decode_seconds, 1e-9), 3),
    )
    out["fast_vs_transformers"] = round(out["fast"]["tokens_per_s"] / out["transformers"]["tokens_per_s"], 2)
    fast.release()
    return out


def _long_context(
    model, arch, device: torch.device, slots: int, context: int, new_tokens: int, bandwidth_gb_s: float
) -> dict:
    """Decode at ~`context` tokens on `slots` slots against the bandwidth bound."""
    from megatron_gopd.rollout import FastRolloutEngine, SamplingParams
    from megatron_gopd.rollout.kv_slots import KVSlotShape

    prompts = _prompts(1, context - new_tokens - 8, arch.vocab_size)
    engine = FastRolloutEngine(model, arch, max_slots=slots)
    sampling = SamplingParams(max_new_tokens=new_tokens, seed=2, n=slots)  # one prompt, prefilled once
    with torch.inference_mode():
        engine.generate(prompts, sampling)  # warm-up and graph capture
        _synchronize(device)
        engine.generate(prompts, sampling)
        _synchronize(device)
    stats = engine.last_stats
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = KVSlotShape.for_model(arch, 1, engine.dtype).bytes_per_token()
    mean_context = len(prompts[0]) + new_tokens / 2
    step_bytes = weight_bytes + slots * mean_context * kv_per_token  # read once per decode step
    decode_tps = slots * stats.decode_steps / stats.decode_seconds
    bound = slots * bandwidth_gb_s * 1e9 / step_bytes
    engine.release()
    return {
        "slots": slots,
        "context": round(mean_context),
        "decode_tokens_per_s": round(decode_tps, 1),
        "bandwidth_bound_tokens_per_s": round(bound, 1),
        "fraction_of_bound": round(decode_tps / bound, 3),
        "achieved_gb_per_s": round(step_bytes * stats.decode_steps / stats.decode_seconds / 1e9, 1),
        "decode_host_fraction": round(stats.decode_host_seconds / stats.decode_seconds, 3),
        "cuda_graphs": stats.cuda_graphs,
        "prefill_seconds": round(stats.prefill_seconds, 2),
    }


def _lm_head(device: torch.device, dtype: torch.dtype, tokens: int, vocab: int, hidden: int) -> dict:
    """The student's log-prob head (hidden states -> target log-probs and entropy, forward + backward):
    16-bit GEMM inputs with fp32 accumulation against the fp32 path and against the naive path
    (16-bit logits, fp32 log-softmax), medians of 5 timed runs; the log-prob gap to an fp64 oracle."""
    from megatron_gopd.logprobs import token_logprobs_from_hidden

    generator = torch.Generator(device=device).manual_seed(0)
    hidden_states = (torch.randn(tokens, 1, hidden, device=device, generator=generator) * 0.5).to(dtype)
    weight = (torch.randn(vocab, hidden, device=device, generator=generator) * hidden**-0.5).to(dtype)
    targets = torch.randint(0, vocab, (tokens, 1), device=device, generator=generator)

    def chunked(gemm_dtype):
        def run():
            h, w = hidden_states.clone().requires_grad_(True), weight.clone().requires_grad_(True)
            logp, entropy = token_logprobs_from_hidden(h, w, targets, with_entropy=True, gemm_dtype=gemm_dtype)
            (logp.sum() + entropy.sum()).backward()
            return logp.detach()

        return run

    def naive():
        h, w = hidden_states.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logits = (h @ w.t()).float().log_softmax(-1)  # [s, b, V] from 16-bit logits
        logp = logits.gather(-1, targets[..., None]).squeeze(-1)
        entropy = -(logits.exp() * logits).sum(-1)
        (logp.sum() + entropy.sum()).backward()
        return logp.detach()

    def timed(fn) -> tuple[float, torch.Tensor]:
        out = fn()
        times = []
        for _ in range(5):
            _synchronize(device)
            start = time.perf_counter()
            out = fn()
            _synchronize(device)
            times.append(time.perf_counter() - start)
        return sorted(times)[2], out

    oracle = (hidden_states.double() @ weight.double().t()).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    out: dict[str, Any] = {"tokens": tokens, "vocab": vocab, "hidden": hidden, "dtype": str(dtype)}
    for name, fn in (("head_16bit_gemm", chunked(None)), ("head_fp32", chunked(torch.float32)), ("naive", naive)):
        seconds, logp = timed(fn)
        gap = (logp.double() - oracle).abs()
        out[name] = {"seconds": seconds, "logp_gap_mean": gap.mean().item(), "logp_gap_max": gap.max().item()}
    out["ratio_16bit_gemm_vs_naive"] = out["head_16bit_gemm"]["seconds"] / out["naive"]["seconds"]
    out["ratio_fp32_vs_naive"] = out["head_fp32"]["seconds"] / out["naive"]["seconds"]
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and token counts (runs on CPU)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--time-budget-s", type=float, default=450.0, help="later phases are skipped past this")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))

    from megatron_gopd import platform

    platform.init_distributed()
    platform.init_model_parallel(tp=1, pp=1)
    device = platform.device()
    report = _Report(args.out, time.monotonic() + args.time_budget_s, device)
    report.data["arguments"] = {k: str(v) for k, v in vars(args).items()}
    report.phase(report.data, "environment", lambda: _environment(device))
    report.phase(report.data, "copy_bandwidth", lambda: _copy_bandwidth(device, 0.05 if args.tiny else 2.0))
    bandwidth = report.data["copy_bandwidth"].get("gb_per_s", 0.0)
    from megatron_gopd.models.builder import torch_dtype

    report.phase(report.data, "attention_kernels", lambda: _kernels(device, torch_dtype(args.dtype)))
    report.phase(
        report.data,
        "lm_head",
        lambda: _lm_head(device, torch_dtype(args.dtype), *((256, 1024, 64) if args.tiny else (4096, 151_936, 2048))),
    )
    shapes = {"tiny": TINY_SHAPE} if args.tiny else SHAPES
    for name, shape in shapes.items():
        section: dict[str, Any] = {}
        report.data[name] = section
        built: dict[str, Any] = {}
        report.phase(
            section,
            "build",
            lambda: built.update(zip(("hf", "model", "arch"), _build(shape, args.dtype, device))) or {},
        )
        if "model" not in built:
            continue
        hf_model, model, arch = built["hf"], built["model"], built["arch"]
        report.phase(
            section,
            "correctness",
            lambda: _correctness(model, arch, device, 4 if args.tiny else 16, 16 if args.tiny else 128),
        )
        if name != "qwen3-1.7b":
            report.phase(
                section,
                "throughput",
                lambda: _throughput(
                    hf_model,
                    model,
                    arch,
                    device,
                    8 if args.tiny else 64,
                    32 if args.tiny else 1024,
                    16 if args.tiny else 128,
                ),
            )
        if name != "qwen3-0.6b":
            report.phase(
                section,
                "long_context",
                lambda: _long_context(
                    model,
                    arch,
                    device,
                    4 if args.tiny else 64,
                    256 if args.tiny else 4096,
                    32 if args.tiny else 256,
                    bandwidth,
                ),
            )
        built = hf_model = model = None  # free the models before the next shape
        if device.type == "cuda":
            torch.cuda.empty_cache()
    platform.shutdown_distributed()
    print(f"wrote {report.path}")


if __name__ == "__main__":
    main(sys.argv[1:])
