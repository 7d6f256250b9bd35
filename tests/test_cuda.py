"""The CUDA paths, on one GPU: rollout, scoring and training where no CPU shim stands in.

Everything else in the suite runs on CPU (gloo, `platform.install_cpu_compat`). These tests run
only where CUDA is available (they are skipped in CI) and check what the CPU cannot: that the
engine, the log-prob paths and a `gopd-train` / `gopd-eval` launch work with real CUDA tensors,
NCCL and, for bf16, Megatron's mixed-precision optimizer. Run them on a GPU machine with

    python -m pytest tests/test_cuda.py -v

Comparisons are in fp32 with TF32 off, against `transformers` on the same GPU.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("GOPD_FORCE_CPU") == "1", reason="needs a CUDA GPU"
)

VOCAB = 300
HF_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
PROMPT_LENGTHS = (5, 11, 3, 8)
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    """(hf_model on the GPU, Megatron GPTModel on the GPU, arch, prompts); one process, TP=1."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_gopd import platform
    from megatron_gopd.bridge import load_hf_weights
    from megatron_gopd.models import ModelArchitecture, ParallelLayout, build_gpt_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # A world of one in this process. Its rendezvous variables must not leak into the launches below
    # (they would try to join this process's store), so the environment is put back afterwards.
    saved_env = dict(os.environ)
    os.environ["MASTER_PORT"] = str(29700 + os.getpid() % 200)
    platform.init_distributed()
    os.environ.clear()
    os.environ.update(saved_env)
    platform.init_model_parallel(tp=1, pp=1)
    torch.manual_seed(0)
    hf_model = Qwen3ForCausalLM(Qwen3Config(**HF_CONFIG)).eval()
    with torch.no_grad():
        hf_model.lm_head.weight.mul_(10.0)  # no greedy near-ties
    hf_dir = tmp_path_factory.mktemp("cuda") / "hf"
    hf_model.save_pretrained(hf_dir)
    arch = ModelArchitecture.from_pretrained(hf_dir)
    model = build_gpt_model(arch, ParallelLayout(), perform_initialization=False)
    load_hf_weights(model, arch, hf_dir)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    yield hf_model.cuda(), model, arch, prompts
    platform.shutdown_distributed()


def test_model_lives_on_the_gpu(gpu_model):
    _, model, _, _ = gpu_model
    assert {p.device.type for p in model.parameters()} == {"cuda"}


def test_greedy_rollout_matches_transformers_on_gpu(gpu_model):
    from megatron_gopd.rollout import MegatronRolloutEngine, SamplingParams

    hf_model, model, arch, prompts = gpu_model
    batch = MegatronRolloutEngine(model, arch).generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS)
    )
    for prompt, sample in zip(prompts, batch):
        with torch.no_grad():
            full = hf_model.generate(
                torch.tensor([prompt], device="cuda"),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert sample.token_ids == full[0, len(prompt) :].tolist()


def test_sampled_logprobs_equal_a_full_forward_on_gpu(gpu_model):
    """KV-cached decode on the GPU scores its tokens as one uncached forward does (fp32)."""
    from megatron_gopd.rollout import MegatronRolloutEngine, SamplingParams

    _, model, arch, prompts = gpu_model
    sampling = SamplingParams(temperature=0.8, top_k=50, max_new_tokens=NEW_TOKENS, n=2, seed=3)
    batch = MegatronRolloutEngine(model, arch).generate(prompts, sampling)
    assert len({tuple(s.token_ids) for s in batch}) > len(prompts) // 2  # n = 2 samples differ
    model.eval()
    worst = 0.0
    for sample in batch:
        prompt = prompts[sample.prompt_index]
        tokens = torch.tensor([prompt + sample.token_ids], device="cuda")  # [1, s]
        with torch.no_grad():
            logits = model(tokens, torch.arange(tokens.shape[1], device="cuda")[None], None)  # [1, s, V_pad]
        logprobs = logits[0, len(prompt) - 1 : -1, :VOCAB].double().log_softmax(-1)  # [L, V]
        reference = logprobs.gather(1, torch.tensor(sample.token_ids, device="cuda")[:, None]).squeeze(1)
        worst = max(worst, (reference.cpu() - torch.tensor(sample.logprobs, dtype=torch.float64)).abs().max().item())
    assert worst < 1e-4, worst


def test_same_seed_same_tokens_on_gpu(gpu_model):
    from megatron_gopd.rollout import MegatronRolloutEngine, SamplingParams

    _, model, arch, prompts = gpu_model
    engine = MegatronRolloutEngine(model, arch)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=NEW_TOKENS, n=2, seed=5)
    first = [s.token_ids for s in engine.generate(prompts, sampling)]
    assert [s.token_ids for s in engine.generate(prompts, sampling)] == first


# ----------------------------------------------------------------------------------------------
# Launches: gopd-train and gopd-eval on one GPU (NCCL world of one)


ONE_GPU = (
    "student.tp=1",
    "scoring.teachers.math.model.tp=1",
    "scoring.teachers.math.model.pp=1",
    "scoring.teachers.code.model.tp=1",
    "scoring.references.math_base.tp=1",
    "scoring.references.math_base.pp=1",
)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, loss", [("float32", "sampled"), ("bfloat16", "topk")])
def test_gopd_train_and_eval_on_one_gpu(tiny_assets, tmp_path, dtype, loss):
    from tests.test_eval import _gopd_eval
    from tests.test_train import gopd_train, read_metrics

    out = tmp_path / f"run_{dtype}"
    result = gopd_train(
        tiny_assets,
        out,
        *ONE_GPU,
        "steps=3",
        "save_every=0",
        f"student.dtype={dtype}",
        f"loss.kind={loss}",
        "loss.topk=16",
        nproc=1,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert all(math.isfinite(v) for v in m.values()), m
        assert m["grad_norm"] > 0
    evaluation = tmp_path / f"eval_{dtype}.json"
    result = _gopd_eval(
        "--model",
        str(out / "hf"),
        "--data",
        str(tiny_assets / "data" / "math.jsonl"),
        "--k",
        "2",
        "--max-new-tokens",
        "8",
        "--enable-thinking",
        "false",
        "--out",
        str(evaluation),
    )
    assert result.returncode == 0, result.stderr[-6000:]
    assert json.loads(evaluation.read_text())


def test_bf16_lm_head_gemm_keeps_fp32_accuracy_on_gpu():
    """The head's 16-bit GEMMs accumulate in fp32: log-probs of a bf16 model stay as close to an fp64
    oracle as the fp32 path's on the same bf16 tensors, and gradients agree with it."""
    from megatron_gopd.logprobs import token_logprobs_from_hidden

    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(512, 2, 256, device="cuda", generator=generator) * 0.5).bfloat16()
    weight = (torch.randn(4096, 256, device="cuda", generator=generator) * 256**-0.5).bfloat16()
    targets = torch.randint(0, 4096, (512, 2), device="cuda", generator=generator)
    oracle = (hidden.double() @ weight.double().t()).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    grads = {}
    for gemm in (None, torch.float32):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logp = token_logprobs_from_hidden(h, w, targets, gemm_dtype=gemm)
        assert logp.dtype == torch.float32 and (logp.double() - oracle).abs().max().item() < 1e-4, gemm
        logp.sum().backward()
        grads[gemm] = w.grad.float()
    torch.testing.assert_close(grads[None], grads[torch.float32], atol=2e-2, rtol=2e-2)
