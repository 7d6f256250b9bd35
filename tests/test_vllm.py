"""The vLLM rollout engine (``rollout.engine=vllm``) with a real vLLM (the CPU build on CPU).

Tiny random Qwen3 models with head_dim 32 (vLLM's CPU attention has no kernel for the other tiny
assets' 16), fp32. Every multi-rank check is one real launch of 2 gloo ranks:

* `test_vllm_engine_inside_the_trainer` (student TP=1 x DP=2, and TP=2): the `Trainer` builds the
  vLLM engine; on the initial weights and again after k optimizer steps whose rollouts vLLM sampled,
  vLLM's greedy output equals the Megatron engine's on the same weights (the weight sync is exact),
  and its sampled log-probs equal a full Megatron forward within 1e-4;
* `test_gopd_train_with_vllm_learns_and_resumes_after_a_kill`: a `gopd-train` run with
  ``rollout.engine=vllm`` is killed (SIGKILL) after its first checkpoint, run again, resumes and
  completes; its reverse KL falls;
* `test_gopd_eval_engines_agree`: ``gopd-eval --engine vllm`` vs the Megatron engine, same seed.

Run as a module under torchrun (``python -m torch.distributed.run ... -m tests.test_vllm ...``) this
file is also the rank program of the first check and the asset builder.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_gopd.rollout.vllm_engine import vllm_installed

REPO = Path(__file__).resolve().parents[1]
HEAD_DIM = 32
NONDETERMINISTIC = ("time/", "tokens_per_s")

needs_vllm = pytest.mark.skipif(not vllm_installed(), reason="vLLM is not installed (make setup installs it)")


# ----------------------------------------------------------------------------------------------
# Assets: head_dim-32 student and teacher (HF + converted), a head_dim-16 student, math prompts


def build_assets(out: Path) -> None:
    """Write ``hf/`` and ``ckpt/`` for student, teacher, student_hd16, and ``data/math.jsonl``."""
    from transformers import Qwen3ForCausalLM

    from megatron_gopd import platform
    from megatron_gopd.bridge.convert import hf_to_mcore
    from megatron_gopd.models import ParallelLayout
    from megatron_gopd.testing.tiny_assets import _write_prompts, tiny_qwen3_config
    from megatron_gopd.testing.tiny_tokenizer import build_tiny_tokenizer

    platform.init_distributed()
    for name, seed, head_dim in (("student", 0, HEAD_DIM), ("teacher", 1, HEAD_DIM), ("student_hd16", 0, 16)):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(tiny_qwen3_config(head_dim=head_dim))
        with torch.no_grad():
            model.lm_head.weight.mul_(6.0)  # distinct, sharp models (as the tiny assets do)
        model.save_pretrained(out / "hf" / name)
        build_tiny_tokenizer(save_dir=str(out / "hf" / name))
        hf_to_mcore(out / "hf" / name, out / "ckpt" / name, ParallelLayout())
    _write_prompts(out / "data", seed=0)
    platform.shutdown_distributed()


def _config_text(assets: Path) -> str:
    return f"""
seed: 7
steps: 4
prompts_per_step: 8
micro_batch_tokens: 512
save_every: 0
export_hf: false
student: {{checkpoint: {assets}/ckpt/student, tp: 1, pp: 1}}
scoring:
  teachers:
    math: {{model: {{checkpoint: {assets}/ckpt/teacher, tp: 1, pp: 1}}, domains: [math], lam: 1.0}}
  micro_batch_tokens: 512
data:
  sources: [{{path: {assets}/data/math.jsonl, share: 1.0}}]
  max_prompt_length: 64
  enable_thinking: false
rollout: {{engine: vllm, max_new_tokens: 16, kv_cache_gb: 0.0625}}
optim: {{lr: 3.0e-3, warmup_steps: 0}}
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vllm_assets")
    subprocess.run(
        [sys.executable, "-m", "tests.test_vllm", "assets", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (out / "train.yaml").write_text(_config_text(out))
    return out


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------------------
# Rank program: the vLLM engine inside the Trainer against the Megatron engine


def _full_forward_logprobs(module, vocab_size: int, prompts: list[list[int]], samples) -> list[list[float]]:
    """Temperature-1 log-probs of every sample's response tokens from one ordinary forward."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    sequences = [prompts[s.prompt_index] + s.token_ids for s in samples]
    width = max(map(len, sequences))
    tokens = torch.tensor([seq + [0] * (width - len(seq)) for seq in sequences])  # [N, s]; right padding
    positions = torch.arange(width)[None, :].expand(len(sequences), -1)  # [N, s]
    was_training = module.training
    module.eval()
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(module(tokens, positions, None))  # [N, s, V_padded]
    module.train(was_training)
    logp = logits[..., :vocab_size].double().log_softmax(-1)  # [N, s, V]
    out = []
    for row, sample in enumerate(samples):
        start = len(prompts[sample.prompt_index])
        targets = torch.tensor(sample.token_ids)[:, None]  # [L, 1]
        out.append(logp[row, start - 1 : start - 1 + len(sample.token_ids)].gather(1, targets).squeeze(1).tolist())
    return out


def _compare_engines(trainer, native, prompts: list[list[int]]) -> dict:
    """Sync the trainer's vLLM engine, then greedy / sampled / stopped / truncated runs of both engines."""
    from megatron_gopd.rollout import SamplingParams

    engine = trainer.engine
    engine.sync_weights()
    vocab = trainer.arch.vocab_size
    module = trainer.model.module
    greedy = SamplingParams(temperature=0.0, max_new_tokens=24)
    out = {"sync_s": engine.last_sync_seconds}
    v, m = engine.generate(prompts, greedy), native.generate(prompts, greedy)
    out["greedy"] = {
        "vllm": [s.token_ids for s in v],
        "megatron": [s.token_ids for s in m],
        "vllm_finish": [s.finish_reason for s in v],
        "megatron_finish": [s.finish_reason for s in m],
        "logprob_gap": max(abs(a - b) for sv, sm in zip(v, m) for a, b in zip(sv.logprobs, sm.logprobs)),
        "vllm_sampler": max(abs(x) for s in v for x in s.sampler_logprobs),
    }
    # A stop token that greedy decoding reaches: both engines end there, with finish reason "stop".
    stop = SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=(m[0].token_ids[2],))
    v, m = engine.generate(prompts, stop), native.generate(prompts, stop)
    out["stop"] = {
        "vllm": [(s.token_ids, s.finish_reason) for s in v],
        "megatron": [(s.token_ids, s.finish_reason) for s in m],
    }
    # The training setting: temperature 1, no truncation, n samples per prompt.
    sampled = SamplingParams(temperature=1.0, max_new_tokens=16, n=2, seed=11)
    v = engine.generate(prompts, sampled)
    reference = _full_forward_logprobs(module, vocab, prompts, v)
    out["sampled"] = {
        "order": [(s.prompt_index, s.sample_index) for s in v],
        "logprob_gap": max(abs(a - b) for s, ref in zip(v, reference) for a, b in zip(s.logprobs, ref)),
        "sampler_gap": max(abs(a - b) for s in v for a, b in zip(s.sampler_logprobs, s.logprobs)),
        "tokens": [s.token_ids for s in v],
        "repeat_tokens": [s.token_ids for s in engine.generate(prompts, sampled)],
    }
    # Truncated sampling: sampler log-probs of the renormalised top-k distribution; no T=1 log-probs.
    truncated = SamplingParams(temperature=0.7, top_k=5, max_new_tokens=12, seed=3)
    v = engine.generate(prompts, truncated)
    gaps, outside = [], 0
    for s, ref in zip(v, _full_forward_logits_sets(module, vocab, prompts, v, truncated)):
        allowed, logp = ref
        outside += sum(t not in a for t, a in zip(s.token_ids, allowed))
        gaps += [abs(x - y) for x, y in zip(s.sampler_logprobs, logp)]
    out["truncated"] = {
        "sampler_gap": max(gaps),
        "outside_top_k": outside,
        "logprobs_none": all(s.logprobs is None for s in v),
    }
    return out


def _full_forward_logits_sets(module, vocab_size: int, prompts, samples, sampling):
    """Per sample: the top-k set of every step and the truncated, tempered log-prob of its token."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    result = []
    module.eval()
    for sample in samples:
        seq = prompts[sample.prompt_index] + sample.token_ids
        with torch.no_grad():
            logits = gather_from_tensor_model_parallel_region(
                module(torch.tensor([seq]), torch.arange(len(seq))[None, :], None)
            )[0, :, :vocab_size]  # [s, V]
        start = len(prompts[sample.prompt_index])
        steps = logits[start - 1 : start - 1 + len(sample.token_ids)].double() / sampling.temperature  # [L, V]
        top = steps.topk(sampling.top_k, dim=-1)
        allowed = [set(row) for row in top.indices.tolist()]
        masked = torch.full_like(steps, -math.inf).scatter(1, top.indices, top.values)
        logp = masked.log_softmax(-1).gather(1, torch.tensor(sample.token_ids)[:, None]).squeeze(1).tolist()
        result.append((allowed, logp))
    module.train()
    return result


def _rank_main(config: str, out_dir: str, tp: int, steps: int) -> None:
    """One rank: a Trainer with rollout.engine=vllm; engine comparisons before and after `steps` steps."""
    import torch.distributed as dist

    from megatron_gopd import platform
    from megatron_gopd.config import load_config
    from megatron_gopd.rollout import MegatronRolloutEngine
    from megatron_gopd.trainer import TrainConfig, Trainer

    platform.init_distributed()
    cfg = load_config(TrainConfig, config, [f"student.tp={tp}", f"output_dir={out_dir}/run"])
    trainer = Trainer(cfg)
    trainer.setup()
    native = MegatronRolloutEngine(trainer.model.module, trainer.arch, eos_token_ids=trainer.engine.eos_token_ids)
    generator = torch.Generator().manual_seed(100 + trainer.dp_rank)  # different prompts per DP replica
    prompts = [torch.randint(0, trainer.arch.vocab_size, (n,), generator=generator).tolist() for n in (3, 7, 5, 12)]
    first = next(trainer.model.module.parameters()).detach().clone()
    report = {"initial": _compare_engines(trainer, native, prompts), "metrics": []}
    for step in range(steps):
        report["metrics"].append(trainer.train_step(step))
    report["param_change"] = (next(trainer.model.module.parameters()) - first).abs().max().item()
    report["trained"] = _compare_engines(trainer, native, prompts)
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    trainer.close()
    platform.shutdown_distributed()


# ----------------------------------------------------------------------------------------------
# Tests


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_engine_inside_the_trainer(assets, tmp_path, tp):
    steps = 3
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "tests.test_vllm",
        "ranks",
        str(assets / "train.yaml"),
        str(tmp_path),
        str(tp),
        str(steps),
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=_env())
    assert result.returncode == 0, result.stderr[-6000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["param_change"] > 0  # the optimizer moved the student
        assert len(report["metrics"]) == steps
        for metrics in report["metrics"]:  # logged every step with this engine
            assert metrics["time/weight_sync_s"] > 0 and math.isfinite(metrics["sampler_logp_abs_diff"])
            # the sampler (vLLM) and the trainer (Megatron) agree on the log-probs of the rollouts
            assert metrics["sampler_logp_abs_diff"] < 1e-4, metrics
        for phase in ("initial", "trained"):
            got = report[phase]
            # the weight sync is exact: greedy decoding is token for token the Megatron engine's
            assert got["greedy"]["vllm"] == got["greedy"]["megatron"], phase
            assert got["greedy"]["vllm_finish"] == got["greedy"]["megatron_finish"]
            assert got["greedy"]["logprob_gap"] < 1e-4 and got["greedy"]["vllm_sampler"] == 0.0
            assert got["stop"]["vllm"] == got["stop"]["megatron"]
            assert got["stop"]["vllm"][0][1] == "stop"
            sampled = got["sampled"]
            assert sampled["order"] == [[p, j] for p in range(4) for j in range(2)]  # prompt-major (JSON lists)
            assert sampled["logprob_gap"] < 1e-4 and sampled["sampler_gap"] == 0.0
            assert sampled["tokens"] == sampled["repeat_tokens"]  # per-sample seeds: reproducible
            assert sampled["tokens"][0] != sampled["tokens"][1]  # ... and distinct within a prompt
            truncated = got["truncated"]
            assert truncated["outside_top_k"] == 0 and truncated["sampler_gap"] < 1e-4
            assert truncated["logprobs_none"]
    if tp == 2:  # one replica: both ranks sampled the same batch
        assert reports[0]["trained"]["sampled"] == reports[1]["trained"]["sampled"]
    else:  # two replicas with their own prompts
        assert reports[0]["trained"]["greedy"]["vllm"] != reports[1]["trained"]["greedy"]["vllm"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gopd_train(assets: Path, output_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "megatron_gopd.cli",
        "gopd-train",
        "--config",
        str(assets / "train.yaml"),
        "--nproc",
        "2",
        f"output_dir={output_dir}",
        *overrides,
    ]


def _read_metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
@needs_vllm
def test_gopd_train_with_vllm_learns_and_resumes_after_a_kill(assets, tmp_path):
    import psutil

    out = tmp_path / "run"
    steps = 16
    args = _gopd_train(assets, out, f"steps={steps}", "save_every=4", "prompts_per_step=16")
    process = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True
    )
    deadline = time.time() + 480
    while len(_read_metrics(out)) < 5 and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert len(_read_metrics(out)) >= 5, process.stderr.read()[-4000:] if process.poll() is not None else "timeout"
    for child in psutil.Process(process.pid).children(recursive=True):  # the launcher and its ranks
        child.kill()
    process.kill()
    process.wait()
    process.stderr.close()
    before_kill = _read_metrics(out)
    saved = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*") if p.is_dir())
    assert saved and saved[-1] >= 4 and len(before_kill) < steps, (saved, len(before_kill))

    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=_env())
    assert result.returncode == 0, result.stderr[-6000:]
    assert "resumed from" in result.stderr
    metrics = _read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))

    def comparable(m: dict) -> dict:
        return {k: v for k, v in m.items() if not k.startswith(NONDETERMINISTIC)}

    # The resumed run redoes the steps after its checkpoint exactly as the killed run did them
    # (same weights, seeds and rollouts).
    for redone in range(saved[-1], len(before_kill)):
        assert comparable(metrics[redone]) == comparable(before_kill[redone]), redone
    kl = [m["reverse_kl/math"] for m in metrics]
    assert sum(kl[-4:]) / 4 < 0.85 * sum(kl[:4]) / 4, kl
    assert all(m["time/weight_sync_s"] > 0 for m in metrics)


def _gopd_eval(assets: Path, out: Path, *args: str) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_gopd.cli",
            "gopd-eval",
            "--model",
            str(assets / "ckpt" / "student"),
            "--data",
            str(assets / "data" / "math.jsonl"),
            "--k",
            "4",
            "--max-prompts",
            "32",
            "--max-new-tokens",
            "12",
            "--seed",
            "5",
            "--out",
            str(out),
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@needs_vllm
def test_gopd_eval_engines_agree(assets, tmp_path):
    native = _gopd_eval(assets, tmp_path / "native.json")
    vllm = _gopd_eval(assets, tmp_path / "vllm.json", "--engine", "vllm", "--kv-cache-gb", "0.0625")
    for field in ("avg_at_k", "truncated_frac"):  # fractions over 128 samples
        a, b = native["overall"][field], vllm["overall"][field]
        noise = math.sqrt(max(a * (1 - a), b * (1 - b), 1 / 128) * 2 / 128)
        assert abs(a - b) <= 4 * noise, (field, a, b)
    a, b = native["overall"]["mean_response_tokens"], vllm["overall"]["mean_response_tokens"]
    assert abs(a - b) <= 0.15 * max(a, b), (a, b)


@pytest.mark.slow
@needs_vllm
def test_unservable_models_fail_the_config_check(assets):
    """gopd-train runs this check before it starts any rank (see test_train's bad-input tests)."""
    from megatron_gopd.config import load_config
    from megatron_gopd.trainer import TrainConfig, check_train_config

    cfg = load_config(TrainConfig, assets / "train.yaml", [f"student.checkpoint={assets}/ckpt/student_hd16"])
    with pytest.raises(ValueError, match="rollout.engine=vllm: vLLM's CPU attention has no kernel for head_dim=16"):
        check_train_config(cfg, world_size=2)
    cfg = load_config(TrainConfig, assets / "train.yaml", ["student.pp=2", "prompts_per_step=2"])
    with pytest.raises(ValueError, match="rollout.engine=vllm: the vLLM engine needs a student with pp=1"):
        check_train_config(cfg, world_size=2)
    with pytest.raises(ValueError, match="rollout.kv_cache_gb must be > 0 or null, got 0"):
        load_config(TrainConfig, assets / "train.yaml", ["rollout.kv_cache_gb=0"])
    check_train_config(load_config(TrainConfig, assets / "train.yaml", []), world_size=2)  # servable


@pytest.mark.slow
@needs_vllm
def test_gopd_eval_engine_vllm_refuses_unservable_models(assets, capfd):
    from megatron_gopd.cli import eval_main

    code = eval_main(
        [
            "--model",
            str(assets / "ckpt" / "student_hd16"),
            "--data",
            str(assets / "data" / "math.jsonl"),
            "--engine",
            "vllm",
            "--nproc",
            "2",
        ]
    )
    assert code == 2  # returned before starting any rank
    assert "--engine vllm: vLLM's CPU attention has no kernel for head_dim=16" in capfd.readouterr().err


def test_check_vllm_support_messages(monkeypatch):
    import dataclasses
    import importlib.util

    from megatron_gopd.rollout import vllm_engine
    from tests.megatron_utils import tiny_arch

    arch = dataclasses.replace(tiny_arch(), kv_channels=HEAD_DIM)
    real_find_spec = importlib.util.find_spec
    with monkeypatch.context() as patched:
        patched.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a)
        )
        with pytest.raises(ValueError, match="rollout.engine=vllm: vLLM is not installed"):
            vllm_engine.check_vllm_support(arch, tp=1, pp=1, where="rollout.engine=vllm")
    if not vllm_installed():
        return
    with pytest.raises(ValueError, match="needs a student with pp=1"):
        vllm_engine.check_vllm_support(arch, tp=1, pp=2, where="x")
    with pytest.raises(ValueError, match="vLLM cannot serve NotAModelForCausalLM"):
        vllm_engine.check_vllm_support(
            dataclasses.replace(arch, hf_architecture="NotAModelForCausalLM"), tp=1, pp=1, where="x"
        )
    with pytest.raises(ValueError, match="no kernel for head_dim=16"):
        vllm_engine.check_vllm_support(dataclasses.replace(arch, kv_channels=16), tp=1, pp=1, where="x")
    vllm_engine.check_vllm_support(arch, tp=2, pp=1, where="x")  # servable: no error
    # a vLLM whose workers cannot reload weights in place (older than the backend needs)
    from vllm.v1.worker.gpu_worker import Worker

    with monkeypatch.context() as patched:
        patched.delattr(Worker, "reload_weights")
        with pytest.raises(ValueError, match=r"x: the installed vLLM \(.*\) has no worker reload_weights"):
            vllm_engine.check_vllm_support(arch, tp=1, pp=1, where="x")


if __name__ == "__main__":
    if sys.argv[1] == "assets":
        build_assets(Path(sys.argv[2]))
    elif sys.argv[1] == "ranks":
        _rank_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))


def test_vllm_memory_options_fit_the_start_up_check():
    """With a fixed KV budget on a GPU, vLLM's start-up check (free >= utilization x total) must pass
    beside the trainer's models: utilization follows the free memory, never above the configured one;
    a budget larger than what is free is refused naming the key. GB are 1e9 bytes, as everywhere."""
    from megatron_gopd.rollout.vllm_engine import vllm_memory_options

    assert vllm_memory_options(None, 0.5, (40e9, 80e9)) == {"gpu_memory_utilization": 0.5}
    assert vllm_memory_options(0.25, 0.5, None) == {"kv_cache_memory_bytes": 250_000_000}  # CPU
    options = vllm_memory_options(8.0, 0.5, (20e9, 80e9))  # the trainer holds 60 of 80 GB
    assert options["kv_cache_memory_bytes"] == 8_000_000_000
    assert options["gpu_memory_utilization"] * 80e9 <= 20e9 and options["gpu_memory_utilization"] > 0.1
    assert vllm_memory_options(8.0, 0.1, (70e9, 80e9))["gpu_memory_utilization"] == 0.1
    with pytest.raises(ValueError, match=r"rollout.kv_cache_gb=30.0 does not fit the 20.0 GB free"):
        vllm_memory_options(30.0, 0.5, (20e9, 80e9))
