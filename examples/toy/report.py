"""The demo's results: the table (printed, ``results.md``, ``results.json``) and the plots.

Accuracy is avg@k at temperature 1 on the held-out prompts. With several student seeds a row shows
the mean and the spread (min..max) over seeds. "vs teacher" is the difference to the teacher in
avg@k points with a 95% interval from a paired bootstrap over prompts (each prompt's accuracy
averaged over seeds first), so it accounts for which prompts were drawn and for the k samples.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Sequence

BOOTSTRAP_RESAMPLES = 2000


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


def paired_bootstrap(model: dict[int, float], reference: dict[int, float], seed: int = 0) -> tuple[float, float, float]:
    """Mean difference model - reference over shared prompts and its 95% bootstrap interval."""
    prompts = sorted(set(model) & set(reference))
    diffs = [model[p] - reference[p] for p in prompts]
    if not diffs:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(BOOTSTRAP_RESAMPLES))
    return sum(diffs) / len(diffs), means[int(0.025 * len(means))], means[int(0.975 * len(means)) - 1]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summarise(entries: Sequence, evals: dict[str, Path], eval_k: int) -> list[dict]:
    """One row per model (seeds of the same model pooled), in `entries` order."""
    groups: dict[str, list] = {}
    for entry in entries:
        groups.setdefault(entry.name, []).append(entry)
    accuracy = {e.key: per_prompt_accuracy(evals[e.key].with_suffix(".samples.jsonl")) for e in entries}
    reports = {e.key: json.loads(evals[e.key].read_text()) for e in entries}

    def pooled(members) -> dict[int, float]:
        prompts = set.intersection(*(set(accuracy[m.key]) for m in members))
        return {p: _mean([accuracy[m.key][p] for m in members]) for p in prompts}

    teacher = pooled(groups["Teacher (RL)"])
    rows = []
    for name, members in groups.items():
        scores = [reports[m.key]["overall"]["avg_at_k"] * 100 for m in members]
        passes = [reports[m.key]["overall"]["pass_at_k"] * 100 for m in members]
        lengths = [reports[m.key]["overall"]["mean_response_tokens"] for m in members]
        first = members[0]
        row = {"model": name, "lam": first.lam, "alpha": first.alpha,
               "seeds": [m.seed for m in members if m.seed is not None],
               f"avg@{eval_k}": _mean(scores), f"avg@{eval_k}_min": min(scores), f"avg@{eval_k}_max": max(scores),
               f"pass@{eval_k}": _mean(passes), "response_tokens": _mean(lengths),
               "per_seed": {m.key: s for m, s in zip(members, scores)}}
        if name != "Teacher (RL)":
            diff, low, high = paired_bootstrap(pooled(members), teacher)
            row.update(vs_teacher=100 * diff, vs_teacher_ci95=[100 * low, 100 * high])
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], eval_k: int) -> str:
    """The results as a Markdown table (also readable as plain text)."""
    header = ["model", "lam / alpha", f"avg@{eval_k} (%)", f"pass@{eval_k} (%)", "vs teacher (95% CI)",
              "resp. tokens", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in rows:
        setting = (f"lam={row['lam']:g}" if row["lam"] is not None else
                   f"alpha={row['alpha']:g}" if row["alpha"] is not None else "")
        score = f"{row[f'avg@{eval_k}']:.1f}"
        if len(row["per_seed"]) > 1:
            score += f" ({row[f'avg@{eval_k}_min']:.1f}..{row[f'avg@{eval_k}_max']:.1f})"
        versus = ("-" if "vs_teacher" not in row else
                  f"{row['vs_teacher']:+.1f} [{row['vs_teacher_ci95'][0]:+.1f}, {row['vs_teacher_ci95'][1]:+.1f}]")
        seeds = ",".join(str(s) for s in row["seeds"]) or "-"
        lines.append(f"| {row['model']} | {setting} | {score} | {row[f'pass@{eval_k}']:.1f} | {versus} | "
                     f"{row['response_tokens']:.1f} | {seeds} |")
    return "\n".join(lines)


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def plot(out: Path, rows: list[dict], entries: Sequence, eval_k: int) -> list[Path]:
    """accuracy_vs_lam.png and training_curves.png under ``<out>/plots``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    metric = f"avg@{eval_k}"
    by_name = {row["model"]: row for row in rows}

    fig, ax = plt.subplots(figsize=(6, 4))
    students = [row for row in rows if row["lam"] is not None]
    ax.errorbar([r["lam"] for r in students], [r[metric] for r in students],
                yerr=[[r[metric] - r[f"{metric}_min"] for r in students], [r[f"{metric}_max"] - r[metric] for r in students]],
                marker="o", capsize=4, label="OPD / ExOPD student")
    expo = [row for row in rows if row["alpha"] is not None]
    if expo:
        ax.plot([r["alpha"] for r in expo], [r[metric] for r in expo], "s--", label="ExPO (alpha)")
    for name, style in (("Teacher (RL)", "k-"), ("Base (noisy SFT)", "k:"), ("SFT on teacher samples", "g-.")):
        if name in by_name:
            ax.axhline(by_name[name][metric], linestyle=style[1:], color=style[0], label=name)
    ax.set_xlabel("lam (reward extrapolation) / alpha (weight extrapolation)")
    ax.set_ylabel(f"{metric} (%), temperature 1")
    ax.set_title("Held-out accuracy against lam")
    ax.legend(fontsize=8)
    fig.tight_layout()
    accuracy_path = plots / "accuracy_vs_lam.png"
    fig.savefig(accuracy_path, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    curves = (("reverse_kl/arith", "reverse KL to the teacher"), ("response_length/mean", "response length (tokens)"),
              ("entropy", "entropy (nats / token)"))
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


def write_report(out: Path, entries: Sequence, evals: dict[str, Path], timings: dict[str, float], *,
                 eval_k: int, seeds: Sequence[int]) -> dict:
    """Summarise, print the table, write results.json / results.md and the plots; return the summary."""
    rows = summarise(entries, evals, eval_k)
    table = markdown_table(rows, eval_k)
    plots = plot(out, rows, entries, eval_k)
    summary = {"metric": f"avg@{eval_k}, temperature 1.0, held-out prompts", "seeds": list(seeds),
               "rows": rows, "timings_s": timings, "plots": [str(p.relative_to(out)) for p in plots]}
    for name, text in (("results.json", json.dumps(summary, indent=2)),
                       ("results.md", f"# megatron-gopd toy demo\n\n{summary['metric']}\n\n{table}\n")):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    print(f"\n{table}\n\nresults: {out / 'results.md'}, {out / 'results.json'}; plots: {out / 'plots'}", flush=True)
    return summary
