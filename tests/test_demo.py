"""The toy demo (examples/toy/demo.py): its data, its statistics, and a 2-step run of every stage."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "examples" / "toy"
sys.path.insert(0, str(TOY))

import demo  # noqa: E402
import report  # noqa: E402


def test_wrong_answers_are_wrong_and_plausible():
    rng = random.Random(0)
    for a in range(10, 100, 7):
        for b in range(10, 100, 5):
            wrong = demo.wrong_answer(a, b, rng)
            assert wrong != a + b and abs(wrong - (a + b)) in (1, 10)


def test_data_noise_share_and_held_out_split(tmp_path):
    settings = demo.DemoSettings(out=tmp_path, sft_examples=4000, eval_prompts=200, noise=0.3)
    demo.write_data(settings, tmp_path)
    rows = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
            for name in ("train", "base_sft", "eval")}
    held_out = {r["prompt"] for r in rows["eval"]}
    assert len(held_out) == 200 and len(rows["train"]) == 90 * 90 - 200
    assert not held_out & {r["prompt"] for r in rows["train"]}
    assert not held_out & {r["prompt"] for r in rows["base_sft"]}
    wrong = sum(r["response"] != f"\\boxed{{{r['answer']}}}" for r in rows["base_sft"])
    assert 0.27 < wrong / len(rows["base_sft"]) < 0.33


def test_paired_bootstrap_interval():
    model = {i: 1.0 if i % 2 else 0.5 for i in range(200)}
    teacher = {i: 0.5 for i in range(200)}
    diff, low, high = report.paired_bootstrap(model, teacher)
    assert diff == pytest.approx(0.25) and low < 0.25 < high and low > 0.15
    diff, low, high = report.paired_bootstrap(teacher, teacher)
    assert diff == low == high == 0.0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_stage_runs_and_a_second_run_skips_them(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, str(TOY / "demo.py"), "--smoke", "--out", str(out)]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    models = [row["model"] for row in results["rows"]]
    assert models == ["Base (noisy SFT)", "Teacher (RL)", "SFT on teacher samples", "OPD (lam=1)",
                      "ExOPD (lam=1.25)", "ExOPD (lam=1.5)", "ExPO (alpha=1.25)", "ExPO (alpha=1.5)"]
    for row in results["rows"]:
        assert 0.0 <= row["avg@2"] <= 100.0 and row["response_tokens"] > 0
    for stage in ("base", "teacher", "teacher_samples", "students/seed1/exopd_lam1.5", "expo/alpha1.5",
                  "eval/teacher"):
        assert results["timings_s"][stage] > 0
    for plot in results["plots"]:
        assert (out / plot).stat().st_size > 1000
    assert "| ExOPD (lam=1.5) | lam=1.5 |" in (out / "results.md").read_text()
    # the SFT student trained on the teacher's samples; the OPD students were scored by the teacher
    samples = [json.loads(line) for line in (out / "teacher_samples" / "train_samples_512.jsonl").read_text().splitlines()]
    assert samples and all("response" in s and "correct" in s for s in samples)
    metrics = [json.loads(line) for line in (out / "students/seed1/exopd_lam1.5/metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and "reverse_kl/arith" in metrics[-1]
    # the teacher stage trained on the verifier's reward alone and logged it
    teacher = [json.loads(line) for line in (out / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert len(teacher) == 2 and all(0.0 <= m["reward/mean"] <= 1.0 for m in teacher)

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "..." not in second.stdout  # nothing ran again
    assert second.stdout.count("skipped") == len(results["timings_s"])


def test_carry_noise_only_drops_carries(tmp_path):
    settings = demo.DemoSettings(out=tmp_path, sft_examples=3000, eval_prompts=100, noise=0.4, noise_kind="carry")
    demo.write_data(settings, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "base_sft.jsonl").read_text().splitlines()]
    carrying = [r for r in rows if sum(int(x) % 10 for x in r["prompt"][:-1].split("+")) >= 10]
    for row in rows:
        given = int(row["response"][len("\\boxed{"):-1])
        assert given in (int(row["answer"]), int(row["answer"]) - 10)
        if row not in carrying:
            assert given == int(row["answer"])
    dropped = sum(int(r["response"][len("\\boxed{"):-1]) != int(r["answer"]) for r in carrying) / len(carrying)
    assert 0.35 < dropped < 0.45


def test_loss_flag_names_runs_apart_and_sets_the_objective(tmp_path):
    recipe = demo.parse_args(["--out", str(tmp_path)])
    assert recipe.opd_tag == "" and recipe.opd_overrides == []
    assert demo._recipe_value("student_opd.yaml", "loss")["kind"] == "topk"
    same = demo.parse_args(["--out", str(tmp_path), "--loss", "topk"])
    assert same.opd_tag == "" and same.opd_overrides == ["loss.kind=topk"]
    sampled = demo.parse_args(["--out", str(tmp_path), "--loss", "sampled", "--student-steps", "160"])
    # SFT students do not depend on the loss: only OPD / ExOPD runs get the suffix
    assert sampled.student_tag == "_steps160" and sampled.opd_tag == "_steps160_sampled"
    assert sampled.opd_overrides == ["loss.kind=sampled", f"optim.lr={demo.SAMPLED_LOSS_LR}",
                                     f"optim.warmup_steps={demo.SAMPLED_LOSS_WARMUP}"]
