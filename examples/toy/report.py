"""The demo's results: the tables (printed, ``results.md``, ``results.json``) and the plots.

Accuracy is avg@k at temperature 1 on the test split (reported only) and on the validation split
(where every recipe choice is made). A student has one value per training seed.

Comparisons ("ExOPD - teacher", "ExOPD - OPD", ...) are differences in avg@k points, paired by
seed (the teacher, base and ExPO are trained once, so each student seed is paired with them; an
ExOPD and an OPD student of the same seed share their data order). Two 95% intervals:

- ``t``: a Student-t interval over the per-seed differences (needs >= 2 seeds). It treats the
  seeds as the sample, so it carries the seed-to-seed variance and, through each seed's value,
  the prompt and sampling noise;
- ``bootstrap``: a hierarchical bootstrap, seeds resampled first and then prompts within each
  seed. With one seed it is a paired bootstrap over prompts alone, which leaves the seed-to-seed
  variance out and is labelled so.

Neither interval covers the variance of the base and teacher themselves (each trained once).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

BOOTSTRAP_RESAMPLES = 2000
TEACHER = "Teacher (RL)"
SPLITS = ("test", "val")


# ----------------------------------------------------------------------------------------------
# Statistics


def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer ``df`` >= 1, by the closed-form finite series.

    With theta = atan(t / sqrt(df)): for odd df, (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5)
    cos^4 + ... up to cos^(df-3))); for even df, sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to
    cos^(df-2)). Exact, so no special-function library is needed.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    term, series = 1.0, 1.0
    if df % 2:
        for j in range(1, (df - 1) // 2):  # terms cos^2 .. cos^(df-3)
            term *= cos2 * (2 * j) / (2 * j + 1)
            series += term
        return (2 / math.pi) * (theta + (sin * math.cos(theta) * series if df > 1 else 0.0))
    for j in range(1, df // 2):  # terms cos^2 .. cos^(df-2)
        term *= cos2 * (2 * j - 1) / (2 * j)
        series += term
    return sin * series


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom, by bisection
    on `t_two_sided_mass` (to about 1e-10)."""
    if not 0.5 < p < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1, got {p}")
    mass = 2 * p - 1
    low, high = 0.0, 1.0
    while t_two_sided_mass(high, df) < mass:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_two_sided_mass(mid, df) < mass:
            low = mid
        else:
            high = mid
        if high - low < 1e-10:
            break
    return (low + high) / 2


def _mean_and_standard_error(values: Sequence[float], what: str) -> tuple[float, float]:
    """Mean of ``values`` and its standard error (sample sd / sqrt(n)); `what` needs n >= 2."""
    n = len(values)
    if n < 2:
        raise ValueError(f"{what} needs at least 2 values, got {n}")
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and its Student-t ``confidence`` interval (needs at least two values)."""
    mean, standard_error = _mean_and_standard_error(values, "a t-interval")
    half = t_quantile(0.5 + confidence / 2, len(values) - 1) * standard_error
    return mean, mean - half, mean + half


def t_test_p(values: Sequence[float]) -> float:
    """Two-sided p-value of Student's one-sample t-test of mean 0 (needs at least two values)."""
    mean, standard_error = _mean_and_standard_error(values, "a t-test")
    if standard_error == 0:
        return 1.0 if mean == 0 else 0.0
    return 1.0 - t_two_sided_mass(abs(mean) / standard_error, len(values) - 1)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of `pvalues` (family-wise error over all of them), same order:
    the i-th smallest is multiplied by (m - i), kept monotone and capped at 1."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted


def hierarchical_bootstrap(
    per_seed: Sequence[dict[int, float]], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Mean difference and its bootstrap interval: seeds resampled with replacement, then the
    prompts within each drawn seed. ``per_seed[i][prompt]`` is seed i's per-prompt difference."""
    import numpy as np

    if not per_seed or not all(per_seed):
        raise ValueError("hierarchical_bootstrap needs at least one seed with at least one prompt")
    arrays = [np.array([diffs[p] for p in sorted(diffs)], dtype=np.float64) for diffs in per_seed]
    point = float(np.mean([a.mean() for a in arrays]))
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for b in range(resamples):
        drawn = rng.integers(len(arrays), size=len(arrays))
        stats[b] = np.mean([arrays[i][rng.integers(len(arrays[i]), size=len(arrays[i]))].mean() for i in drawn])
    tail = (1 - confidence) / 2
    return point, float(np.quantile(stats, tail)), float(np.quantile(stats, 1 - tail))


def paired_bootstrap(model: dict[int, float], reference: dict[int, float], seed: int = 0) -> tuple[float, float, float]:
    """Mean difference model - reference over shared prompts and its 95% bootstrap interval over
    prompts (one seed: the hierarchical bootstrap's prompt level alone)."""
    prompts = sorted(set(model) & set(reference))
    if not prompts:
        return float("nan"), float("nan"), float("nan")
    return hierarchical_bootstrap([{p: model[p] - reference[p] for p in prompts}], seed=seed)


# ----------------------------------------------------------------------------------------------
# Tables


def per_prompt_accuracy(samples_path: Path) -> dict[int, float]:
    """Fraction of correct samples per prompt, from a `gopd-eval --samples-out` file."""
    counts: dict[int, list[int]] = {}
    with open(samples_path) as f:
        for line in f:
            row = json.loads(line)
            hits = counts.setdefault(row["prompt_index"], [0, 0])
            hits[0] += bool(row["correct"])
            hits[1] += 1
    return {index: correct / total for index, (correct, total) in counts.items()}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def avg_points(accuracy: dict[int, float]) -> float:
    """avg@k in points from per-prompt accuracies (every prompt has k samples)."""
    return 100 * _mean(list(accuracy.values()))


def compare(model: Sequence, reference: Sequence, accuracy: dict[str, dict[int, float]]) -> dict:
    """``model - reference`` on one split: per-seed differences (paired by seed, or every seed
    against a model trained once), the t-interval over seeds and the hierarchical bootstrap."""
    by_seed = {r.seed: r for r in reference}
    pairs = [(m, by_seed.get(m.seed, reference[0] if len(reference) == 1 else None)) for m in model]
    pairs = [(m, r) for m, r in pairs if r is not None]
    if not pairs:
        raise ValueError(f"no seed of {model[0].name} has a {reference[0].name} to compare with")
    per_prompt = []
    for m, r in pairs:
        prompts = sorted(set(accuracy[m.key]) & set(accuracy[r.key]))
        per_prompt.append({p: 100 * (accuracy[m.key][p] - accuracy[r.key][p]) for p in prompts})
    per_seed = [_mean(list(d.values())) for d in per_prompt]
    mean, boot_low, boot_high = hierarchical_bootstrap(per_prompt)
    result = {
        "model": model[0].name,
        "reference": reference[0].name,
        "n_seeds": len(pairs),
        "seeds": [m.seed for m, _ in pairs],
        "per_seed": per_seed,
        "mean": mean,
        "bootstrap_ci95": [boot_low, boot_high],
        "bootstrap_levels": "seeds, then prompts" if len(pairs) > 1 else "prompts only (1 seed)",
        "t_ci95": None,
        "t_p": None,
        "t_p_holm": None,
    }
    if len(pairs) > 1:
        result["t_ci95"] = list(t_interval(per_seed)[1:])
        result["t_p"] = t_test_p(per_seed)
    return result


def summarise(entries: Sequence, evals: dict[str, dict[str, Path]], eval_k: int) -> dict:
    """Rows (one per model, seeds grouped, in `entries` order) and comparisons, for each split.

    ``evals[split][key]`` is the `gopd-eval` report of entry ``key`` on ``split``.
    """
    groups: dict[str, list] = {}
    for entry in entries:
        groups.setdefault(entry.name, []).append(entry)
    accuracy = {
        split: {e.key: per_prompt_accuracy(evals[split][e.key].with_suffix(".samples.jsonl")) for e in entries}
        for split in SPLITS
    }
    reports = {e.key: json.loads(evals["test"][e.key].read_text()) for e in entries}

    rows = []
    for name, members in groups.items():
        first = members[0]
        row = {
            "model": name,
            "lam": first.lam,
            "alpha": first.alpha,
            "loss": first.loss,
            "seeds": [m.seed for m in members if m.seed is not None],
        }
        for split in SPLITS:
            per_seed = [avg_points(accuracy[split][m.key]) for m in members]
            row[f"{split}_avg@{eval_k}"] = _mean(per_seed)
            row[f"{split}_avg@{eval_k}_per_seed"] = per_seed
        row[f"test_pass@{eval_k}"] = _mean([reports[m.key]["overall"]["pass_at_k"] * 100 for m in members])
        row["test_response_tokens"] = _mean([reports[m.key]["overall"]["mean_response_tokens"] for m in members])
        rows.append(row)

    comparisons = []
    for name, members in groups.items():
        references = [TEACHER] if name != TEACHER else []
        if members[0].lam is not None and members[0].lam != 1.0:
            references += [n for n, g in groups.items() if g[0].lam == 1.0 and g[0].loss == members[0].loss]
        for reference in references:
            comparisons.append({split: compare(members, groups[reference], accuracy[split]) for split in SPLITS})
    for split in SPLITS:  # the family: every comparison of the split that has a t-test
        tested = [c[split] for c in comparisons if c[split]["t_p"] is not None]
        for result, adjusted in zip(tested, holm([r["t_p"] for r in tested])):
            result["t_p_holm"] = adjusted
    return {"rows": rows, "comparisons": comparisons}


def _interval(values: Optional[Sequence[float]]) -> str:
    return "n/a (1 seed)" if values is None else f"[{values[0]:+.1f}, {values[1]:+.1f}]"


def _p(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown_tables(summary: dict, eval_k: int) -> str:
    """The accuracy table and the comparison table, in Markdown (also readable as plain text)."""
    metric = f"avg@{eval_k}"
    lines = [
        f"| model | lam / alpha | loss | test {metric} (%) | test, per seed | val {metric} (%) | val, per seed "
        f"| test pass@{eval_k} (%) | resp. tokens | seeds |",
        "|" + "|".join(["---"] * 10) + "|",
    ]
    for row in summary["rows"]:
        setting = (
            f"lam={row['lam']:g}"
            if row["lam"] is not None
            else f"alpha={row['alpha']:g}"
            if row["alpha"] is not None
            else ""
        )
        per_seed = {split: " / ".join(f"{v:.1f}" for v in row[f"{split}_{metric}_per_seed"]) for split in SPLITS}
        lines.append(
            f"| {row['model']} | {setting} | {row['loss'] or ''} | {row[f'test_{metric}']:.1f} | "
            f"{per_seed['test']} | {row[f'val_{metric}']:.1f} | {per_seed['val']} | "
            f"{row[f'test_pass@{eval_k}']:.1f} | {row['test_response_tokens']:.1f} | "
            f"{','.join(str(s) for s in row['seeds']) or '-'} |"
        )
    lines += [
        "",
        f"Differences in {metric} points, paired by seed; 95% intervals: t over the per-seed differences, "
        "and a bootstrap over seeds then prompts (prompts only with one seed). p: two-sided t-test over "
        "the per-seed differences, and Holm-adjusted over every comparison of the table that has one "
        "(the intervals are not adjusted).",
        "",
        "| comparison | test: mean | test: per seed | test: t 95% CI | test: bootstrap 95% CI "
        "| test: p | test: p, Holm | val: mean | val: t 95% CI | seeds |",
        "|" + "|".join(["---"] * 10) + "|",
    ]
    for comparison in summary["comparisons"]:
        test, val = comparison["test"], comparison["val"]
        per_seed = " / ".join(f"{v:+.1f}" for v in test["per_seed"])
        lines.append(
            f"| {test['model']} - {test['reference']} | {test['mean']:+.1f} | {per_seed} | "
            f"{_interval(test['t_ci95'])} | {_interval(test['bootstrap_ci95'])} | {_p(test['t_p'])} | "
            f"{_p(test['t_p_holm'])} | {val['mean']:+.1f} | "
            f"{_interval(val['t_ci95'])} | {test['n_seeds']} |"
        )
    return "\n".join(lines)


def tuning_table(tuning: Sequence[dict], eval_k: int) -> str:
    """The `--tune-lr` sweeps in Markdown: validation avg@k per lr and lam, the chosen lr (empty
    without a sweep)."""
    if not tuning:
        return ""
    lines = []
    for sweep in tuning:
        lams = sweep["lams"]
        lines += [
            "",
            "",
            f"Learning-rate choice for the {sweep['loss']} students (seed {sweep['seed']}, validation split "
            f"only; chosen: the best mean over lam, {sweep['chosen_lr']:g}):",
            "",
            "| peak lr | " + " | ".join(f"val avg@{eval_k}, lam={lam:g}" for lam in lams) + " | mean |",
            "|" + "|".join(["---"] * (len(lams) + 2)) + "|",
        ]
        for lr, values in sweep["val_avg"].items():
            mark = " (chosen)" if float(lr) == sweep["chosen_lr"] else ""
            lines.append(f"| {lr}{mark} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {_mean(values):.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Plots


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def plot(out: Path, rows: list[dict], entries: Sequence, eval_k: int) -> list[Path]:
    """accuracy_vs_lam.png (test split) and training_curves.png under ``<out>/plots``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    metric = f"test_avg@{eval_k}"
    by_name = {row["model"]: row for row in rows}

    fig, ax = plt.subplots(figsize=(6, 4))
    for loss in sorted({row["loss"] for row in rows if row["lam"] is not None}):
        students = [row for row in rows if row["lam"] is not None and row["loss"] == loss]
        spread = [
            [r[metric] - min(r[f"{metric}_per_seed"]) for r in students],
            [max(r[f"{metric}_per_seed"]) - r[metric] for r in students],
        ]
        ax.errorbar(
            [r["lam"] for r in students],
            [r[metric] for r in students],
            yerr=spread,
            marker="o",
            capsize=4,
            label=f"OPD / ExOPD student ({loss})",
        )
    expo = [row for row in rows if row["alpha"] is not None]
    if expo:
        ax.plot([r["alpha"] for r in expo], [r[metric] for r in expo], "s--", label="ExPO (alpha)")
    for name, style in ((TEACHER, "k-"), ("Base (noisy SFT)", "k:"), ("SFT on teacher samples", "g-.")):
        if name in by_name:
            ax.axhline(by_name[name][metric], linestyle=style[1:], color=style[0], label=name)
    ax.set_xlabel("lam (reward extrapolation) / alpha (weight extrapolation)")
    ax.set_ylabel(f"avg@{eval_k} (%), test split, temperature 1")
    ax.set_title("Test accuracy against lam (bars: min..max over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    accuracy_path = plots / "accuracy_vs_lam.png"
    fig.savefig(accuracy_path, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    curves = (
        ("reverse_kl/arith", "reverse KL to the teacher"),
        ("response_length/mean", "response length (tokens)"),
        ("entropy", "entropy (nats / token)"),
    )
    for entry in entries:
        if entry.lam is None or entry.run_dir is None:
            continue
        metrics = _read_metrics(entry.run_dir)
        for ax, (key, _) in zip(axes, curves):
            points = [(m["step"], m[key]) for m in metrics if key in m]
            if points:
                ax.plot(*zip(*points), label=f"{entry.name} seed {entry.seed}", linewidth=1)
    for ax, (_, title) in zip(axes, curves):
        ax.set_xlabel("step")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    curves_path = plots / "training_curves.png"
    fig.savefig(curves_path, dpi=120)
    plt.close(fig)
    return [accuracy_path, curves_path]


def write_report(
    out: Path,
    entries: Sequence,
    evals: dict[str, dict[str, Path]],
    timings: dict[str, float],
    *,
    eval_k: int,
    seeds: Sequence[int],
    recipes: dict[str, dict],
    splits: dict[str, int],
    tuning: Sequence[dict] = (),
) -> dict:
    """Summarise, print the tables, write results.json / results.md and the plots; return the summary.

    ``recipes`` are the OPD / ExOPD students' settings per loss kind (steps, lr, warmup), ``splits``
    the number of prompts per split, ``tuning`` the validation figures of each `--tune-lr` sweep;
    all are recorded so a table says what produced it.
    """
    summary = summarise(entries, evals, eval_k)
    tables = markdown_tables(summary, eval_k) + tuning_table(tuning, eval_k)
    plots = plot(out, summary["rows"], entries, eval_k)
    metric = f"avg@{eval_k}, temperature 1.0"
    summary = {
        "metric": metric,
        "seeds": list(seeds),
        "splits": splits,
        "student_recipes": recipes,
        "lr_tuning": list(tuning),
        **summary,
        "timings_s": timings,
        "plots": [str(p.relative_to(out)) for p in plots],
    }
    header = (
        f"# megatron-gopd toy demo\n\n{metric}; test split ({splits['test']} prompts) reported only, "
        f"validation split ({splits['val']} prompts) for tuning; student seeds {list(seeds)}.\n"
        f"OPD / ExOPD recipes: " + "; ".join(f"{loss}: {r}" for loss, r in recipes.items()) + "\n\n"
    )
    for name, text in (("results.json", json.dumps(summary, indent=2)), ("results.md", header + tables + "\n")):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    print(f"\n{tables}\n\nresults: {out / 'results.md'}, {out / 'results.json'}; plots: {out / 'plots'}", flush=True)
    return summary
