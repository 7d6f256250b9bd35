"""`gopd-train --plan`: the per-rank memory plan of every paper config, and jobs that cannot fit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gopd.config import load_config
from megatron_gopd.models import ModelArchitecture, ParallelLayout
from megatron_gopd.planner import GB, kv_bytes_per_token, parameters_per_rank
from megatron_gopd.trainer import TrainConfig
from megatron_gopd.trainer.memory import plan_train_memory

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "configs"
SHAPES = CONFIGS / "model_shapes"
PAPER_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if "tiny" not in p.name)


@pytest.mark.parametrize("device_gb", [80, 141])
@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_configs_fit_one_node(path, device_gb):
    """Each paper config fits 8 GPUs of 80 GB (H100) and 141 GB (H200) with fused attention, and its
    rollout holds a useful number of 16K-token samples (the KV budget, not batch x length, sets it)."""
    cfg = load_config(TrainConfig, path)
    plan = plan_train_memory(cfg, world_size=8, device_gb=device_gb, shapes_dir=str(SHAPES), attention="sdpa")
    print(
        f"{path.stem} @ {device_gb} GB: KV {plan.phases[0].items['KV cache'] / GB:.1f} GB, "
        f"{plan.kv_slots} slots of {plan.sample_tokens} tokens"
    )
    assert plan.fits, plan.table()
    assert plan.kv_slots >= 16, plan.table()


def test_the_kv_cache_follows_the_budget_not_batch_times_length():
    cfg = load_config(TrainConfig, CONFIGS / "exopd_strong_to_weak_30b_to_1.7b.yaml")
    cfg.rollout.kv_cache_gb = 20.0
    plan = plan_train_memory(cfg, world_size=8, device_gb=80, shapes_dir=str(SHAPES), attention="sdpa")
    # Qwen3-1.7B keeps 28 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 112 KiB per token
    arch = ModelArchitecture.from_hf_config(__import__("json").loads((SHAPES / "Qwen3-1.7B.json").read_text()))
    assert kv_bytes_per_token(arch, tp=1, dtype="bfloat16") == 112 * 1024
    assert plan.kv_slots == int(20e9 // ((1024 + 16384) * 112 * 1024)) == 10
    assert plan.phases[0].items["KV cache"] == 20e9


def test_parameter_count_of_a_public_model_is_right():
    """Qwen3-1.7B has 1.72e9 parameters (tied embeddings): the planner's count at TP=1 x PP=1."""
    arch = ModelArchitecture.from_hf_config(__import__("json").loads((SHAPES / "Qwen3-1.7B.json").read_text()))
    assert parameters_per_rank(arch, ParallelLayout()) == pytest.approx(1.72e9, rel=0.01)
    assert parameters_per_rank(arch, ParallelLayout(tp=2)) == pytest.approx(1.72e9 / 2, rel=0.02)


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_gopd.cli",
            "gopd-train",
            "--plan",
            "--device",
            "cuda",
            "--world-size",
            "8",
            "--model-shapes",
            str(SHAPES),
            "--attention",
            "sdpa",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.slow
def test_plan_command_prints_the_table_and_refuses_an_oversized_job():
    config = str(CONFIGS / "exopd_single_teacher_math.yaml")
    ok = _plan_cli("--config", config, "--device-memory-gb", "80")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "rollout KV slots:" in ok.stdout and "DOES NOT FIT" not in ok.stdout
    too_big = _plan_cli(
        "--config", config, "--device-memory-gb", "80", "micro_batch_tokens=262144", "student.recompute=false"
    )
    assert too_big.returncode == 2, too_big.stdout + too_big.stderr
    assert "DOES NOT FIT: training" in too_big.stdout and "micro_batch_tokens" in too_big.stdout
    no_kv = _plan_cli("--config", config, "--device-memory-gb", "80", "rollout.kv_cache_gb=0.5")
    assert no_kv.returncode == 2 and "the KV budget holds no sample" in no_kv.stdout, no_kv.stdout


@pytest.mark.slow
def test_plan_on_cpu_plans_host_memory(tiny_assets, tmp_path):
    """A CPU job is planned as CPU ranks: each rank's share of this machine's RAM, no CUDA context,
    the engines' CPU KV default; the tiny 4-rank config fits."""
    import psutil

    config = tmp_path / "tiny.yaml"
    text = (CONFIGS / "tiny_multi_teacher.yaml").read_text().replace("outputs/tiny_assets", str(tiny_assets))
    config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "megatron_gopd.cli", "gopd-train", "--plan", "--device", "cpu"]
        + ["--config", str(config), "--nproc", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on 4 CPU ranks" in result.stdout and "DOES NOT FIT" not in result.stdout
    assert "CUDA context" not in result.stdout and "process runtime" in result.stdout
    share = psutil.virtual_memory().total / 1e9 / 4
    assert f"(device {share:.1f} GB)" in result.stdout, result.stdout
    assert "the CPU default rollout.kv_cache_gb=1.0" in result.stdout
