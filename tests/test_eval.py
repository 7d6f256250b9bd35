"""gopd-eval: avg@k / pass@k aggregation, and the command on HF and Megatron checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gopd.evaluation.avg_at_k import SampleVerdict, aggregate

REPO = Path(__file__).resolve().parents[1]


def test_avg_and_pass_at_k_per_domain():
    verdicts = [
        # math prompt 0: 1 of 4 correct; prompt 1: 4 of 4; code prompt 2: 0 of 4
        *(SampleVerdict(0, "math", i == 0, 10, False) for i in range(4)),
        *(SampleVerdict(1, "math", True, 20, i == 3) for i in range(4)),
        *(SampleVerdict(2, "code", False, 30, False) for i in range(4)),
    ]
    report = aggregate(verdicts, k=4)
    math, code = report.domains["math"], report.domains["code"]
    assert (math.prompts, math.samples) == (2, 8)
    assert math.avg_at_k == pytest.approx((0.25 + 1.0) / 2) and math.pass_at_k == 1.0
    assert code.avg_at_k == 0.0 and code.pass_at_k == 0.0
    assert report.overall.avg_at_k == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    assert report.overall.pass_at_k == pytest.approx(2 / 3)
    assert math.truncated_frac == pytest.approx(1 / 8) and math.mean_response_tokens == 15
    assert "avg@4" in report.table() and "overall" in report.table()


def _gopd_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_gopd.cli", "gopd-eval", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
@pytest.mark.parametrize("which", ["hf", "ckpt"])
def test_gopd_eval_runs_on_hf_and_megatron_models(tiny_assets, tmp_path, which):
    out, samples_out = tmp_path / "report.json", tmp_path / "samples.jsonl"
    result = _gopd_eval(
        "--model",
        str(tiny_assets / which / "student"),
        "--data",
        str(tiny_assets / "data" / "math.jsonl"),
        "--k",
        "2",
        "--max-prompts",
        "5",
        "--max-new-tokens",
        "6",
        "--nproc",
        "2",
        "--out",
        str(out),
        "--samples-out",
        str(samples_out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["k"] == 2 and report["overall"]["prompts"] == 5 and report["overall"]["samples"] == 10
    assert 0.0 <= report["domains"]["math"]["avg_at_k"] <= 1.0
    assert "avg@2" in result.stdout
    # every sample, in prompt order, with the record's fields: a prompt file for `gopd-train mode=sft`
    rows = [json.loads(line) for line in samples_out.read_text().splitlines()]
    sources = [json.loads(line) for line in (tiny_assets / "data" / "math.jsonl").read_text().splitlines()]
    assert [r["prompt_index"] for r in rows] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for row in rows:
        source = sources[row["prompt_index"]]
        assert row["prompt"] == [{"role": "user", "content": source["prompt"]}] and row["answer"] == source["answer"]
        assert isinstance(row["response"], str) and isinstance(row["correct"], bool) and row["response_tokens"] <= 6
    assert sum(r["correct"] for r in rows) / 10 == pytest.approx(report["overall"]["avg_at_k"])


@pytest.mark.slow
def test_gopd_eval_bad_input(tmp_path):
    result = _gopd_eval("--model", str(tmp_path / "missing"), "--data", str(tmp_path / "x.jsonl"))
    assert result.returncode == 2 and "does not exist" in result.stderr


@pytest.mark.slow
def test_gopd_eval_fast_engine_reproduces_the_megatron_engine(tiny_assets, tmp_path):
    """`gopd-eval --engine fast` samples the same responses as `--engine megatron` (same seeds)."""
    samples = {}
    for engine in ("fast", "megatron"):
        out = tmp_path / f"{engine}.jsonl"
        result = _gopd_eval(
            "--model",
            str(tiny_assets / "hf" / "student"),
            "--data",
            str(tiny_assets / "data" / "math.jsonl"),
            "--k",
            "2",
            "--max-prompts",
            "6",
            "--max-new-tokens",
            "8",
            "--engine",
            engine,
            "--samples-out",
            str(out),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        samples[engine] = [json.loads(line) for line in out.read_text().splitlines()]
    assert samples["fast"] == samples["megatron"]
