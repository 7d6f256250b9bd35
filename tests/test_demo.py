"""The toy demo (examples/toy/demo.py): its data, its statistics, and a 2-step run of every stage."""

from __future__ import annotations

import json
import math
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


def _pair(prompt: str) -> tuple[int, int]:
    """The unordered pair {a, b} of a prompt ``a+b=``."""
    a, b = (int(x) for x in prompt[:-1].split("+"))
    return min(a, b), max(a, b)


def test_data_noise_share_and_three_way_split(tmp_path):
    settings = demo.DemoSettings(out=tmp_path, sft_examples=4000, val_prompts=150, test_prompts=200, noise=0.3)
    demo.write_data(settings, tmp_path)
    rows = {
        name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        for name in ("train", "base_sft", "val", "test")
    }
    pairs = {name: [_pair(r["prompt"]) for r in split] for name, split in rows.items()}
    # one sum per pair in val and test; neither a sum nor its twin b + a in another split
    assert len(pairs["test"]) == len(set(pairs["test"])) == 200
    assert len(pairs["val"]) == len(set(pairs["val"])) == 150
    assert not set(pairs["test"]) & (set(pairs["val"]) | set(pairs["train"]) | set(pairs["base_sft"]))
    assert not set(pairs["val"]) & (set(pairs["train"]) | set(pairs["base_sft"]))
    # every other sum of 10..99 + 10..99 is in the training pool, once
    prompts = [r["prompt"] for r in rows["train"]]
    held_out = sum(1 if a == b else 2 for a, b in pairs["test"] + pairs["val"])  # the sums and their twins
    assert len(prompts) == len(set(prompts)) == 90 * 90 - held_out
    assert all(r["answer"] == str(sum(_pair(r["prompt"]))) for split in rows.values() for r in split)
    wrong = sum(r["response"] != f"\\boxed{{{r['answer']}}}" for r in rows["base_sft"])
    assert 0.27 < wrong / len(rows["base_sft"]) < 0.33


def test_split_refuses_sizes_that_leave_no_training_pairs():
    with pytest.raises(ValueError, match="val_prompts \\+ test_prompts"):
        demo.split_problems(val_size=2000, test_size=2095)


def test_t_quantile_matches_the_tables():
    # two-sided 95% and 90% critical values of Student's t (any statistics table)
    table_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 19: 2.093, 29: 2.045}
    for df, value in table_975.items():
        assert report.t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)
    assert report.t_quantile(0.95, 4) == pytest.approx(2.132, abs=1e-3)
    assert report.t_quantile(0.975, 2000) == pytest.approx(1.960, abs=2e-3)  # the normal limit
    # df 1 and 2 have elementary closed forms: tan(pi (p - 1/2)) and (2p - 1) sqrt(2 / (1 - (2p - 1)^2))
    for p in (0.6, 0.9, 0.99):
        assert report.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-8)
        x = 2 * p - 1
        assert report.t_quantile(p, 2) == pytest.approx(x * math.sqrt(2 / (1 - x * x)), rel=1e-8)
    with pytest.raises(ValueError):
        report.t_quantile(0.3, 4)
    with pytest.raises(ValueError):
        report.t_interval([1.0])


def test_t_test_p_and_holm_adjustment():
    # five values whose t statistic is the 97.5% quantile at df 4 (2.776): p = 0.05 two-sided
    spread = [-2.0, -1.0, 0.0, 1.0, 2.0]  # sd sqrt(2.5), standard error sqrt(0.5)
    shift = 2.7764451 * math.sqrt(0.5)
    assert report.t_test_p([v + shift for v in spread]) == pytest.approx(0.05, abs=1e-6)
    assert report.t_test_p([-v - shift for v in spread]) == pytest.approx(0.05, abs=1e-6)  # two-sided
    assert report.t_test_p([1.0, 1.0, 1.0]) == 0.0 and report.t_test_p([0.0, 0.0]) == 1.0
    with pytest.raises(ValueError):
        report.t_test_p([1.0])
    # Holm: sorted 0.01 x 4, 0.02 x 3, 0.03 x 2 (kept monotone: 0.06), 0.5 x 1; the input order is kept
    assert report.holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert report.holm([0.4, 0.9]) == pytest.approx([0.8, 0.9]) and report.holm([]) == []


def test_t_interval_covers_the_mean_95_percent_of_the_time():
    rng = random.Random(0)
    trials, covered = 4000, 0
    for _ in range(trials):
        values = [rng.gauss(1.5, 2.0) for _ in range(5)]  # five seeds
        _, low, high = report.t_interval(values)
        covered += low <= 1.5 <= high
    assert abs(covered / trials - 0.95) < 0.012  # binomial sd ~0.0034
    mean, low, high = report.t_interval([2.7, 0.7, 1.1])  # the three per-seed gaps
    assert mean == pytest.approx(1.5) and (low, high) == pytest.approx((-1.13, 4.13), abs=0.01)


def test_hierarchical_bootstrap_carries_the_seed_spread():
    rng = random.Random(1)
    # five seeds whose mean gaps differ (+3 .. -1) with little prompt noise within a seed
    seeds = [{p: gap + rng.gauss(0, 0.2) for p in range(256)} for gap in (3.0, 2.0, 1.0, 0.0, -1.0)]
    mean, low, high = report.hierarchical_bootstrap(seeds)
    assert mean == pytest.approx(1.0, abs=0.05) and low < 0.0 < 2.0 < high  # seeds dominate the width
    prompts_only = report.hierarchical_bootstrap([{p: v for s in seeds for p, v in enumerate(s.values())}])
    assert prompts_only[2] - prompts_only[1] < 0.5 * (high - low)


def test_paired_bootstrap_interval():
    model = {i: 1.0 if i % 2 else 0.5 for i in range(200)}
    teacher = {i: 0.5 for i in range(200)}
    diff, low, high = report.paired_bootstrap(model, teacher)
    assert diff == pytest.approx(0.25) and low < 0.25 < high and low > 0.15
    diff, low, high = report.paired_bootstrap(teacher, teacher)
    assert diff == low == high == 0.0


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 16 evaluations (validation and test) and 7 trainings; 2 shared cores run it 2-3x slower
def test_every_stage_runs_and_a_second_run_skips_them(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, str(TOY / "demo.py"), "--smoke", "--out", str(out)]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    models = [row["model"] for row in results["rows"]]
    assert models == [
        "Base (noisy SFT)",
        "Teacher (RL)",
        "SFT on teacher samples",
        "OPD (lam=1)",
        "ExOPD (lam=1.25)",
        "ExOPD (lam=1.5)",
        "ExPO (alpha=1.25)",
        "ExPO (alpha=1.5)",
    ]
    for row in results["rows"]:
        for split in ("test", "val"):
            assert 0.0 <= row[f"{split}_avg@2"] <= 100.0 and len(row[f"{split}_avg@2_per_seed"]) == 1
        assert row["test_response_tokens"] > 0
    # each model against the teacher, each ExOPD against OPD; one seed: a bootstrap over prompts, no t-interval
    compared = [(c["test"]["model"], c["test"]["reference"]) for c in results["comparisons"]]
    assert compared == [
        ("Base (noisy SFT)", "Teacher (RL)"),
        ("SFT on teacher samples", "Teacher (RL)"),
        ("OPD (lam=1)", "Teacher (RL)"),
        ("ExOPD (lam=1.25)", "Teacher (RL)"),
        ("ExOPD (lam=1.25)", "OPD (lam=1)"),
        ("ExOPD (lam=1.5)", "Teacher (RL)"),
        ("ExOPD (lam=1.5)", "OPD (lam=1)"),
        ("ExPO (alpha=1.25)", "Teacher (RL)"),
        ("ExPO (alpha=1.5)", "Teacher (RL)"),
    ]
    for comparison in results["comparisons"]:
        for split in ("test", "val"):
            c = comparison[split]
            assert c["t_ci95"] is None and c["bootstrap_levels"] == "prompts only (1 seed)"
            assert c["bootstrap_ci95"][0] <= c["mean"] <= c["bootstrap_ci95"][1] and c["per_seed"] == [c["mean"]]
    assert results["splits"] == {"val": 16, "test": 16} and results["student_recipes"]["topk"]["lr"] == 2e-3
    for stage in (
        "base",
        "teacher",
        "teacher_samples",
        "students/seed1/exopd_lam1.5",
        "expo/alpha1.5",
        "eval/test/teacher",
        "eval/val/teacher",
    ):
        assert results["timings_s"][stage] > 0
    for plot in results["plots"]:
        assert (out / plot).stat().st_size > 1000
    assert "| ExOPD (lam=1.5) | lam=1.5 | topk |" in (out / "results.md").read_text()
    # the SFT student trained on the teacher's samples; the OPD students were scored by the teacher
    samples_path = out / "teacher_samples" / "train_samples_512.jsonl"
    samples = [json.loads(line) for line in samples_path.read_text().splitlines()]
    assert samples and all("response" in s and "correct" in s for s in samples)
    metrics_path = out / "students/seed1/exopd_lam1.5/metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    assert len(metrics) == 2 and "reverse_kl/arith" in metrics[-1]
    # the teacher stage trained on the verifier's reward alone and logged it
    teacher = [json.loads(line) for line in (out / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert len(teacher) == 2 and all(0.0 <= m["reward/mean"] <= 1.0 for m in teacher)

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "..." not in second.stdout  # nothing ran again
    assert second.stdout.count("skipped") == len(results["timings_s"])


def test_carry_noise_only_drops_carries(tmp_path):
    settings = demo.DemoSettings(out=tmp_path, sft_examples=3000, test_prompts=100, noise=0.4, noise_kind="carry")
    demo.write_data(settings, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "base_sft.jsonl").read_text().splitlines()]
    carrying = [r for r in rows if sum(int(x) % 10 for x in r["prompt"][:-1].split("+")) >= 10]
    for row in rows:
        given = int(row["response"][len("\\boxed{") : -1])
        assert given in (int(row["answer"]), int(row["answer"]) - 10)
        if row not in carrying:
            assert given == int(row["answer"])
    dropped = sum(int(r["response"][len("\\boxed{") : -1]) != int(r["answer"]) for r in carrying) / len(carrying)
    assert 0.35 < dropped < 0.45


def test_loss_flag_names_runs_apart_and_sets_the_objective(tmp_path):
    recipe = demo.parse_args(["--out", str(tmp_path)])
    assert recipe.losses == ("topk",) and recipe.opd_tag("topk") == ""
    # the topk recipe is student_opd.yaml's own
    yaml_recipe = demo.OpdRecipe(
        steps=demo._recipe_value("student_opd.yaml", "steps"),
        lr=demo._recipe_value("student_opd.yaml", "optim")["lr"],
        warmup=demo._recipe_value("student_opd.yaml", "optim")["warmup_steps"],
    )
    assert demo._recipe_value("student_opd.yaml", "loss")["kind"] == "topk"
    assert demo.OPD_RECIPES["topk"] == yaml_recipe == recipe.opd_recipe("topk")
    assert recipe.opd_overrides("topk") == ["loss.kind=topk", "steps=80", "optim.lr=0.002", "optim.warmup_steps=30"]
    # the sampled estimator: its own longer, smaller-lr recipe and runs of its own
    both = demo.parse_args(["--out", str(tmp_path), "--loss", "topk", "sampled"])
    assert both.losses == ("topk", "sampled") and both.opd_tag("sampled") == "_sampled"
    assert both.opd_overrides("sampled") == [
        "loss.kind=sampled",
        "steps=200",
        "optim.lr=0.001",
        "optim.warmup_steps=20",
    ]
    sampled = demo.parse_args(["--out", str(tmp_path), "--loss", "sampled", "--student-steps", "160"])
    # SFT students do not depend on the loss: only OPD / ExOPD runs get the suffix
    assert sampled.student_tag == "_steps160" and sampled.opd_tag("sampled") == "_steps160_sampled"
    assert sampled.opd_overrides("sampled")[:2] == ["loss.kind=sampled", "steps=160"]
    # validation tuning: an lr or warmup other than the recipe's trains runs of its own
    tuned = demo.parse_args(["--out", str(tmp_path), "--loss", "sampled", "--opd-lr", "3e-4", "--opd-warmup", "40"])
    assert tuned.opd_tag("sampled") == "_sampled_lr0.0003_warmup40"
    assert tuned.opd_overrides("sampled")[2:] == ["optim.lr=0.0003", "optim.warmup_steps=40"]
    assert demo.parse_args(["--out", str(tmp_path), "--opd-lr", "2e-3"]).opd_tag("topk") == ""


def test_the_readme_names_the_command_of_its_table():
    """The README's command, demo.py's docstring and its one-seed hint name the same arguments."""
    readme = (REPO / "README.md").read_text()
    assert f'make demo DEMO_ARGS="{demo.README_TABLE_ARGS}"' in readme
    assert f"python examples/toy/demo.py {demo.README_TABLE_ARGS}" in readme
    assert f"python examples/toy/demo.py {demo.README_TABLE_ARGS}" in demo.__doc__


def test_report_pairs_students_by_seed_and_gives_seed_level_intervals(tmp_path):
    """summarise / markdown_tables on made-up evaluations: three seeds, teacher trained once."""
    correct = {"teacher": {1: 0.5}, "opd": {1: 0.5, 2: 0.75, 3: 0.625}, "exopd": {1: 0.75, 2: 0.75, 3: 1.0}}
    entries = [demo.ModelEntry("Teacher (RL)", "teacher", tmp_path)]
    for seed in (1, 2, 3):
        entries += [
            demo.ModelEntry("OPD (lam=1)", f"opd_seed{seed}", tmp_path, seed=seed, lam=1.0, loss="topk"),
            demo.ModelEntry("ExOPD (lam=1.5)", f"exopd_seed{seed}", tmp_path, seed=seed, lam=1.5, loss="topk"),
        ]
    evals = {}
    for split in ("val", "test"):
        for entry in entries:
            share = correct[entry.key.split("_")[0]][entry.seed or 1]
            path = tmp_path / split / f"{entry.key}.json"
            path.parent.mkdir(exist_ok=True)
            k = 8  # every prompt gets round(share * k) correct samples of k
            path.with_suffix(".samples.jsonl").write_text(
                "".join(
                    json.dumps({"prompt_index": p, "correct": i < round(share * k)}) + "\n"
                    for p in range(20)
                    for i in range(k)
                )
            )
            path.write_text(json.dumps({"overall": {"avg_at_k": share, "pass_at_k": 1.0, "mean_response_tokens": 5}}))
            evals.setdefault(split, {})[entry.key] = path
    summary = report.summarise(entries, evals, eval_k=8)
    rows = {row["model"]: row for row in summary["rows"]}
    assert rows["OPD (lam=1)"]["test_avg@8_per_seed"] == [50.0, 75.0, 62.5]
    assert rows["OPD (lam=1)"]["val_avg@8"] == pytest.approx(62.5) and rows["OPD (lam=1)"]["seeds"] == [1, 2, 3]
    by_pair = {(c["test"]["model"], c["test"]["reference"]): c["test"] for c in summary["comparisons"]}
    assert set(by_pair) == {
        ("OPD (lam=1)", "Teacher (RL)"),
        ("ExOPD (lam=1.5)", "Teacher (RL)"),
        ("ExOPD (lam=1.5)", "OPD (lam=1)"),
    }
    versus_opd = by_pair[("ExOPD (lam=1.5)", "OPD (lam=1)")]
    assert versus_opd["per_seed"] == [25.0, 0.0, 37.5] and versus_opd["n_seeds"] == 3  # paired by seed
    assert versus_opd["t_ci95"] == pytest.approx(list(report.t_interval([25.0, 0.0, 37.5])[1:]))
    assert versus_opd["bootstrap_levels"] == "seeds, then prompts"
    # Holm over the three comparisons of the split, each with its own t-test
    tested = [by_pair[pair] for pair in sorted(by_pair)]
    assert versus_opd["t_p"] == pytest.approx(report.t_test_p([25.0, 0.0, 37.5]))
    assert [c["t_p_holm"] for c in tested] == pytest.approx(report.holm([c["t_p"] for c in tested]))
    # prompts agree within a seed here, so the bootstrap's spread is the seeds' alone
    assert versus_opd["bootstrap_ci95"][0] >= 0.0 and versus_opd["bootstrap_ci95"][1] <= 37.5
    assert by_pair[("ExOPD (lam=1.5)", "Teacher (RL)")]["per_seed"] == [25.0, 25.0, 50.0]
    table = report.markdown_tables(summary, eval_k=8)
    assert "| ExOPD (lam=1.5) - OPD (lam=1) | +20.8 | +25.0 / +0.0 / +37.5 |" in table


def test_an_output_directory_from_before_the_split_is_refused(tmp_path):
    """Its base and teacher trained on a pool that held today's test sums: reusing them would leak."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "eval.jsonl").write_text("")
    with pytest.raises(RuntimeError, match="before the train / validation / test split"):
        demo.Demo(demo.DemoSettings.smoke(tmp_path)).run()
    assert not (tmp_path / "data" / "test.jsonl").exists()


def test_tune_lr_chooses_by_validation_alone(tmp_path, monkeypatch):
    """`--tune-lr`: every candidate (and the recipe's lr) trains every lam on the first seed; the
    best mean validation avg@k wins; the test split is never evaluated for the choice."""
    settings = demo.parse_args(["--out", str(tmp_path), "--seeds", "3", "4", "--tune-lr", "1e-3", "4e-3"])
    assert settings.tune_lrs == (1e-3, 4e-3)
    with pytest.raises(SystemExit):
        demo.parse_args(["--out", str(tmp_path), "--tune-lr", "1e-3", "--opd-lr", "1e-3"])
    # made-up validation accuracy per (lr, lam): 4e-3 wins on the mean, not on every lam
    val_share = {1e-3: [0.5, 0.5, 0.5], 2e-3: [0.75, 0.25, 0.25], 4e-3: [0.25, 0.75, 0.75]}
    trained, evaluated = [], []

    def fake_student(self, seed, loss, lam, base_ckpt, teacher_ckpt, lr=None):
        trained.append((seed, loss, lam, lr))
        key = f"lam{lam:g}_seed{seed}{self.s.opd_tag(loss, lr)}"
        return demo.ModelEntry("x", key, tmp_path, seed=seed, lam=lam, loss=loss)

    def fake_evaluate(self, entry, split):
        evaluated.append(split)
        share = val_share[float(entry.key.split("_lr")[1]) if "_lr" in entry.key else 2e-3]
        share = share[demo.OPD_LAMS.index(entry.lam)]
        path = tmp_path / f"{split}_{entry.key}.json"
        path.with_suffix(".samples.jsonl").write_text(
            "".join(
                json.dumps({"prompt_index": p, "correct": i < round(share * 4)}) + "\n"
                for p in range(5)
                for i in range(4)
            )
        )
        return path

    monkeypatch.setattr(demo.Demo, "_opd_student", fake_student)
    monkeypatch.setattr(demo.Demo, "_evaluate", fake_evaluate)
    sweep = demo.Demo(settings)._tune_lr("topk", tmp_path, tmp_path)
    assert set(evaluated) == {"val"} and len(trained) == 9 and {t[0] for t in trained} == {3}  # first seed only
    assert sweep["chosen_lr"] == 4e-3 and settings.chosen_lrs == {"topk": 4e-3}
    assert sweep["val_avg"]["0.004"] == pytest.approx([25.0, 75.0, 75.0])
    # every seed now trains with the chosen lr, in runs of their own
    assert settings.opd_recipe("topk").lr == 4e-3 and settings.opd_tag("topk") == "_lr0.004"
    table = report.tuning_table([sweep], eval_k=4)
    assert (
        "| 0.004 (chosen) | 25.0 | 75.0 | 75.0 | 58.3 |" in table and "| 0.002 | 75.0 | 25.0 | 25.0 | 41.7 |" in table
    )
