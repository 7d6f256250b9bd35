#!/usr/bin/env python
"""The paper's finding in miniature, on CPU: a student distilled with reward extrapolation (ExOPD,
lam > 1) beats its teacher; plain on-policy distillation (OPD, lam = 1) only matches it.

    python examples/toy/demo.py                 # what `make demo` runs (about 21 minutes on 2 cores)
    python examples/toy/demo.py --seeds 1 2 3   # students with several training seeds, mean +- spread
    python examples/toy/demo.py --smoke         # every stage for 2 steps (what the tests run)

The task is two-digit addition with the answer in ``\\boxed{}``, checked by the math verifier. Every
stage runs a real command (`gopd-convert`, `gopd-train`, `gopd-eval`, `tools/expo.py`) whose log lands
in ``<out>/logs/``; a stage whose outputs exist is skipped, so a second run only redoes what is
missing (delete a stage's directory to redo it). The stages:

1. ``data``     prompts: a training pool, an SFT set where a share of the answers is wrong, and a
                held-out evaluation set (no overlap with the training pool);
2. ``init``     a random tiny Qwen3 (char tokenizer) -> `gopd-convert hf-to-mcore`;
3. ``base``     `gopd-train mode=sft` on the noisy SFT set: an imperfect base;
4. ``teacher``  `gopd-train reward.only=true` from the base (GRPO-style RL on the verifier reward);
5. ``teacher_samples``  `gopd-eval --samples-out` of the teacher on the training pool;
6. ``students`` from the base, per seed: SFT on the teacher's samples, OPD (lam 1.0), ExOPD (lam 1.25,
                1.5), all with the same prompts per step and steps; OPD / ExOPD minimise the exact
                reverse KL to their target over the whole vocabulary (``--loss sampled``: the
                paper's sampled-token estimator);
7. ``expo``     `tools/expo.py`: base + alpha * (teacher - base), training-free, alpha 1.25 and 1.5;
8. ``eval``     `gopd-eval` avg@k at temperature 1.0 on the held-out set for every model;
9. ``report``   ``results.json``, ``results.md`` (the table, also printed), ``plots/*.png`` and
                ``timings.json`` (wall time per stage).

The training recipe lives in ``examples/toy/configs/*.yaml``; this script only fills in paths, seeds
and lam. `benchmarks/bench_demo.py` reads ``timings.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).resolve().parent / "configs"
TOOLS = REPO / "tools"

DOMAIN = "math"
OPD_LAMS = (1.0, 1.25, 1.5)
EXPO_ALPHAS = (1.25, 1.5)
SAMPLED_LOSS_LR = 1e-3
"""Peak lr of OPD / ExOPD students with ``--loss sampled`` (2e-3 diverges, 5e-4 stalls)."""
SAMPLED_LOSS_WARMUP = 10
"""Warmup steps with ``--loss sampled``: the recipe's 30 keeps the lr high for longer, and the
sampled OPD student (seed 1) then diverged (avg@8 52.5, against 73.3 with 10)."""


# ----------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass
class DemoSettings:
    """What a demo run does; the defaults are `make demo`'s."""

    out: Path = REPO / "outputs" / "demo"
    seeds: tuple[int, ...] = (1,)
    """Training seeds of the students (base, teacher and ExPO are trained once)."""
    nproc: int = 2
    """CPU ranks per command (data-parallel; the models are too small to split)."""
    noise: float = 0.3
    """Share of wrong answers in the base model's SFT data (of the carrying sums with ``carry``)."""
    noise_kind: str = "slips"
    """``slips``: a wrong answer is a dropped carry or a digit off by one (`wrong_answer`);
    ``carry``: only sums with a carry are corrupted, always by dropping it (one systematic error)."""
    sft_examples: int = 6000
    eval_prompts: int = 256
    eval_k: int = 8
    eval_seed: int = 0
    max_new_tokens: int = 16
    steps: dict[str, int] = dataclasses.field(default_factory=dict)
    """Steps per training stage (``base``, ``teacher``, ``student``); empty: the YAML's."""
    hidden_size: int = 128
    num_layers: int = 4
    custom_student_steps: bool = False
    """Set by `--student-steps`: student runs get a ``_steps<N>`` suffix."""
    student_loss: Optional[str] = None
    """``loss.kind`` of the OPD / ExOPD students (``topk`` or ``sampled``); None: the YAML's. A
    kind other than the YAML's adds a ``_<kind>`` suffix to the student runs."""

    @property
    def student_tag(self) -> str:
        """Suffix of student run names when `--student-steps` overrides the recipe (so runs of
        different lengths sit side by side)."""
        return f"_steps{self.steps['student']}" if self.custom_student_steps else ""

    @property
    def opd_tag(self) -> str:
        """`student_tag`, plus ``_<kind>`` for OPD / ExOPD students when `--loss` is not the recipe's."""
        if self.student_loss and self.student_loss != _recipe_value("student_opd.yaml", "loss")["kind"]:
            return f"{self.student_tag}_{self.student_loss}"
        return self.student_tag

    @property
    def opd_overrides(self) -> list[str]:
        """Overrides of student_opd.yaml for `student_loss`."""
        if self.student_loss == "sampled":
            # The sampled-token gradient is noisier: the recipe's peak lr makes it diverge.
            return ["loss.kind=sampled", f"optim.lr={SAMPLED_LOSS_LR}", f"optim.warmup_steps={SAMPLED_LOSS_WARMUP}"]
        return [f"loss.kind={self.student_loss}"] if self.student_loss else []

    @classmethod
    def smoke(cls, out: Path) -> "DemoSettings":
        """Every stage for 2 steps on a handful of prompts (a test of the plumbing, not of the result)."""
        return cls(out=out, sft_examples=256, eval_prompts=16, eval_k=2, hidden_size=64, num_layers=2,
                   steps={"base": 2, "teacher": 2, "student": 2})


# ----------------------------------------------------------------------------------------------
# Stage 1: data


def addition_problems(seed: int) -> list[tuple[int, int]]:
    """Every a + b with 10 <= a, b <= 99, shuffled."""
    problems = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(problems)
    return problems


def wrong_answer(a: int, b: int, rng: random.Random) -> int:
    """A plausible slip: the carry dropped, or a digit off by one."""
    total = a + b
    no_carry = (a // 10 + b // 10) * 10 + (a + b) % 10  # tens added without the units' carry
    choices = [no_carry] if no_carry != total else []
    choices += [total + 1, total - 1, total + 10, total - 10]
    return rng.choice(choices)


def write_data(settings: DemoSettings, data_dir: Path) -> None:
    """train.jsonl (the RL / distillation prompt pool), base_sft.jsonl (noisy answers) and eval.jsonl."""
    problems = addition_problems(seed=0)
    held_out, pool = problems[: settings.eval_prompts], problems[settings.eval_prompts:]
    rng = random.Random(1)

    def record(a: int, b: int) -> dict:
        return {"prompt": f"{a}+{b}=", "domain": DOMAIN, "answer": str(a + b)}

    def write(path: Path, rows: list[dict]) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(tmp, path)

    data_dir.mkdir(parents=True, exist_ok=True)
    sft = []
    for a, b in (rng.choice(pool) for _ in range(settings.sft_examples)):
        answer = a + b
        if settings.noise_kind == "carry":
            if a % 10 + b % 10 >= 10 and rng.random() < settings.noise:
                answer -= 10  # the units' carry never reaches the tens
        elif rng.random() < settings.noise:
            answer = wrong_answer(a, b, rng)
        sft.append({**record(a, b), "response": f"\\boxed{{{answer}}}"})
    write(data_dir / "train.jsonl", [record(a, b) for a, b in pool])
    write(data_dir / "base_sft.jsonl", sft)
    write(data_dir / "eval.jsonl", [record(a, b) for a, b in held_out])


# ----------------------------------------------------------------------------------------------
# Stage 2: a random initial model


def write_initial_model(settings: DemoSettings, hf_dir: Path, seed: int = 0) -> None:
    """A random Qwen3-shaped model with the tiny character tokenizer, saved as a HF directory."""
    import torch
    import transformers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_gopd.testing.tiny_tokenizer import TINY_VOCAB_SIZE, build_tiny_tokenizer

    h = settings.hidden_size
    config = Qwen3Config(vocab_size=TINY_VOCAB_SIZE, hidden_size=h, intermediate_size=3 * h,
                         num_hidden_layers=settings.num_layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=h // 4, max_position_embeddings=256, tie_word_embeddings=False,
                         rope_theta=10000.0)
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    tmp = hf_dir.with_name(hf_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    Qwen3ForCausalLM(config).save_pretrained(tmp)
    build_tiny_tokenizer(save_dir=str(tmp))
    os.replace(tmp, hf_dir)


# ----------------------------------------------------------------------------------------------
# Running commands


class StageRunner:
    """Runs the demo's commands with logs under ``<out>/logs``, skips finished stages, times them."""

    def __init__(self, settings: DemoSettings) -> None:
        self.settings = settings
        self.logs = settings.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.timings_path = settings.out / "timings.json"
        self.timings: dict[str, float] = (json.loads(self.timings_path.read_text())
                                          if self.timings_path.is_file() else {})
        self._prefix = ""

    def stage(self, name: str, done: Path, work: Callable[[], None], what: str) -> None:
        """Run `work` unless `done` exists; record its wall time under `name`."""
        if done.exists():
            print(f"  {name:<28} skipped ({_relative(done)} exists)", flush=True)
            return
        self._prefix = f"  {name:<28} {what} ..."
        print(self._prefix, end="", flush=True)
        start = time.perf_counter()
        work()
        if not done.exists():
            raise RuntimeError(f"stage {name} finished without writing {done}")
        self.timings[name] = round(time.perf_counter() - start, 1)
        if sys.stdout.isatty():  # replace the progress counter
            print(f"\r{self._prefix}" + " " * 20 + f"\r{self._prefix}", end="")
        tmp = self.timings_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.timings, indent=2))
        os.replace(tmp, self.timings_path)
        print(f" {self.timings[name]:.0f} s", flush=True)

    def command(self, name: str, argv: Sequence[str], progress: Optional[Path] = None,
                total_steps: int = 0) -> None:
        """Run one command, output to ``logs/<name>.log``; optionally show training progress."""
        log_path = self.logs / f"{name.replace('/', '_')}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(str(a) for a in argv) + "\n")
            log.flush()
            process = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT,
                                       cwd=REPO, env=env)
            stop = threading.Event()
            watcher = None
            if progress is not None and total_steps:
                watcher = threading.Thread(target=_watch_steps, args=(progress, total_steps, self._prefix, stop), daemon=True)
                watcher.start()
            code = process.wait()
            stop.set()
            if watcher is not None:
                watcher.join()
        if code != 0:
            tail = log_path.read_text().splitlines()[-30:]
            raise RuntimeError(f"{name} failed (exit {code}); last lines of {_relative(log_path)}:\n"
                               + "\n".join(tail))

    def cli(self, name: str, command: str, args: Sequence[str], **kwargs) -> None:
        """A megatron-gopd console command, run with this interpreter."""
        self.command(name, [sys.executable, "-m", "megatron_gopd.cli", command, *args], **kwargs)


def _watch_steps(metrics: Path, total: int, prefix: str, stop: threading.Event) -> None:
    """Show a training stage's progress from its metrics.jsonl: an updating counter on a terminal,
    every quarter otherwise (logs)."""
    tty = sys.stdout.isatty()
    shown = 0
    while not stop.wait(1.0):
        steps = _count_lines(metrics)
        if tty and steps != shown:
            print(f"\r{prefix} step {steps}/{total}", end="", flush=True)
            shown = steps
        elif not tty and steps * 4 // total > shown * 4 // total:
            print(f" {steps}/{total}", end="", flush=True)
            shown = steps


def _count_lines(path: Path) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One row of the results table."""

    name: str
    """Row label, e.g. ``ExOPD (lam=1.25)``."""
    key: str
    """File-name key, e.g. ``exopd_lam1.25``."""
    hf_dir: Path
    seed: Optional[int] = None
    lam: Optional[float] = None
    alpha: Optional[float] = None
    run_dir: Optional[Path] = None
    """The gopd-train output directory (metrics.jsonl), when trained."""


class Demo:
    """The stages of the demo, in order (see the module docstring)."""

    def __init__(self, settings: DemoSettings) -> None:
        self.s = settings
        self.out = settings.out
        self.data = self.out / "data"
        self.runner = StageRunner(settings)

    # -- helpers

    def _nproc(self) -> list[str]:
        return ["--nproc", str(self.s.nproc)]

    def _steps(self, stage: str) -> list[str]:
        return [f"steps={self.s.steps[stage]}"] if stage in self.s.steps else []

    def _total_steps(self, config: str, stage: str) -> int:
        return self.s.steps.get(stage) or _recipe_value(config, "steps")

    def _train(self, name: str, config: str, stage: str, run_dir: Path, overrides: Sequence[str]) -> None:
        self.runner.stage(name, run_dir / "hf" / "config.json", lambda: self.runner.cli(
            name, "gopd-train", ["--config", CONFIGS / config, *self._nproc(), f"output_dir={run_dir}",
                                 *self._steps(stage), *overrides],
            progress=run_dir / "metrics.jsonl", total_steps=self._total_steps(config, stage)),
            what=f"gopd-train {config}")

    def _convert(self, name: str, hf_dir: Path, ckpt: Path) -> None:
        self.runner.stage(name, ckpt / "gopd_checkpoint.json", lambda: self.runner.cli(
            name, "gopd-convert", ["hf-to-mcore", "--hf-dir", hf_dir, "--out", ckpt]),
            what="gopd-convert hf-to-mcore")

    def _sample(self, name: str, model: Path, data: Path, k: int, seed: int, report: Path, samples: Path,
                extra: Sequence[str] = ()) -> None:
        """`gopd-eval` at temperature 1, rendering prompts as training did (no thinking block)."""
        self.runner.cli(name, "gopd-eval", [
            "--model", model, "--data", data, "--k", str(k), "--temperature", "1.0",
            "--max-new-tokens", str(self.s.max_new_tokens), "--seed", str(seed), "--enable-thinking", "false",
            *extra, *self._nproc(), "--out", report, "--samples-out", samples])

    def _evaluate(self, entry: ModelEntry) -> Path:
        result = self.out / "eval" / f"{entry.key}.json"
        self.runner.stage(f"eval/{entry.key}", result, lambda: self._sample(
            f"eval_{entry.key}", entry.hf_dir, self.data / "eval.jsonl", self.s.eval_k, self.s.eval_seed,
            result, result.with_suffix(".samples.jsonl")), what=f"gopd-eval avg@{self.s.eval_k}")
        return result

    # -- stages

    def run(self) -> dict:
        """Run (or skip) every stage and return the results table as a dict."""
        s, out = self.s, self.out
        out.mkdir(parents=True, exist_ok=True)
        r = self.runner
        print(f"megatron-gopd demo -> {_relative(out)} (seeds {list(s.seeds)}, {s.nproc} ranks)", flush=True)

        r.stage("data", self.data / "eval.jsonl", lambda: write_data(s, self.data), what="arithmetic prompts")
        init_hf = out / "init" / "hf"
        r.stage("init", init_hf / "config.json", lambda: write_initial_model(s, init_hf),
                what="random tiny Qwen3")
        self._convert("init/convert", init_hf, out / "init" / "mcore")

        base_run = out / "base"
        self._train("base", "base_sft.yaml", "base", base_run, [
            f"student.checkpoint={out / 'init' / 'mcore'}",
            f"data.sources=[{{path: {self.data / 'base_sft.jsonl'}}}]"])
        base_ckpt = out / "base_mcore"
        self._convert("base/convert", base_run / "hf", base_ckpt)

        teacher_run = out / "teacher"
        self._train("teacher", "teacher_grpo.yaml", "teacher", teacher_run, [
            f"student.checkpoint={base_ckpt}", f"data.sources=[{{path: {self.data / 'train.jsonl'}}}]"])
        teacher_ckpt = out / "teacher_mcore"
        self._convert("teacher/convert", teacher_run / "hf", teacher_ckpt)

        # as many teacher samples as the SFT student sees prompts
        sft_prompts = self._total_steps("student_sft.yaml", "student") * _recipe_value("student_sft.yaml",
                                                                                       "prompts_per_step")
        samples = out / "teacher_samples" / f"train_samples_{sft_prompts}.jsonl"
        r.stage("teacher_samples", samples, lambda: self._sample(
            "teacher_samples", teacher_run / "hf", self.data / "train.jsonl", 1, 7, samples.with_suffix(".eval.json"),
            samples, extra=["--max-prompts", str(sft_prompts)]), what="gopd-eval --samples-out")

        entries = [ModelEntry("Base (noisy SFT)", "base", base_run / "hf", run_dir=base_run),
                   ModelEntry("Teacher (RL)", "teacher", teacher_run / "hf", run_dir=teacher_run)]
        for seed in s.seeds:
            run = out / "students" / f"seed{seed}{s.student_tag}"
            self._train(f"students/seed{seed}{s.student_tag}/sft", "student_sft.yaml", "student", run / "sft", [
                f"seed={seed}", f"student.checkpoint={base_ckpt}", f"data.sources=[{{path: {samples}}}]"])
            entries.append(ModelEntry("SFT on teacher samples", f"sft_seed{seed}{s.student_tag}", run / "sft" / "hf",
                                      seed=seed, run_dir=run / "sft"))
            opd_run = out / "students" / f"seed{seed}{s.opd_tag}"
            for lam in OPD_LAMS:
                key = f"{'opd' if lam == 1.0 else 'exopd'}_lam{lam:g}"
                self._train(f"students/seed{seed}{s.opd_tag}/{key}", "student_opd.yaml", "student", opd_run / key, [
                    f"seed={seed}", f"student.checkpoint={base_ckpt}",
                    f"scoring.teachers.arith.model.checkpoint={teacher_ckpt}",
                    f"scoring.teachers.arith.lam={lam}", *s.opd_overrides,
                    f"data.sources=[{{path: {self.data / 'train.jsonl'}}}]"])
                label = "OPD (lam=1)" if lam == 1.0 else f"ExOPD (lam={lam:g})"
                entries.append(ModelEntry(label, f"{key}_seed{seed}{s.opd_tag}", opd_run / key / "hf", seed=seed,
                                          lam=lam, run_dir=opd_run / key))
        for alpha in EXPO_ALPHAS:
            expo_dir = out / "expo" / f"alpha{alpha:g}"
            r.stage(f"expo/alpha{alpha:g}", expo_dir / "config.json", lambda expo_dir=expo_dir, alpha=alpha: r.command(
                f"expo_alpha{alpha:g}", [sys.executable, TOOLS / "expo.py", "--base", base_run / "hf",
                                          "--teacher", teacher_run / "hf", "--alpha", str(alpha), "--out", expo_dir]),
                what="tools/expo.py")
            entries.append(ModelEntry(f"ExPO (alpha={alpha:g})", f"expo_alpha{alpha:g}", expo_dir, alpha=alpha))

        evals = {entry.key: self._evaluate(entry) for entry in entries}
        from report import write_report  # examples/toy/report.py

        return write_report(out, entries, evals, self.runner.timings, eval_k=s.eval_k, seeds=s.seeds)


def _recipe_value(config: str, key: str):
    import yaml

    return yaml.safe_load((CONFIGS / config).read_text())[key]


# ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> DemoSettings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--out", type=Path, default=None, help="output directory (default outputs/demo, "
                                                               "outputs/demo_smoke with --smoke)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="student training seeds (default 1)")
    parser.add_argument("--nproc", type=int, default=None, help="CPU ranks per command (default 2)")
    parser.add_argument("--noise", type=float, default=None,
                        help="share of wrong answers in the base's SFT data (default 0.3)")
    parser.add_argument("--noise-kind", choices=["slips", "carry"], default=None,
                        help="slips: dropped carries and off-by-one digits (default); carry: only dropped carries")
    parser.add_argument("--student-steps", type=int, default=None,
                        help="training steps of every student (default: examples/toy/configs/student_*.yaml); "
                             "students of different step counts need different --out directories")
    parser.add_argument("--loss", choices=["topk", "sampled"], default=None,
                        help="objective of the OPD / ExOPD students: topk = exact reverse KL to the G-OPD "
                             "target over the whole (tiny) vocabulary (the recipe's), sampled = the paper's "
                             "sampled-token policy gradient")
    parser.add_argument("--smoke", action="store_true", help="2 steps per stage on tiny data")
    args = parser.parse_args(argv)
    settings = (DemoSettings.smoke(args.out or REPO / "outputs" / "demo_smoke") if args.smoke
                else DemoSettings(out=args.out or REPO / "outputs" / "demo"))
    if args.seeds:
        settings.seeds = tuple(args.seeds)
    if args.nproc:
        settings.nproc = args.nproc
    if args.noise is not None:
        settings.noise = args.noise
    if args.noise_kind:
        settings.noise_kind = args.noise_kind
    if args.loss:
        settings.student_loss = args.loss
    if args.student_steps:
        settings.steps["student"] = args.student_steps
        settings.custom_student_steps = True
    settings.out = settings.out.resolve()
    return settings


def main(argv: Optional[Sequence[str]] = None) -> int:
    settings = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    start = time.perf_counter()
    try:
        Demo(settings).run()
    except RuntimeError as err:
        print(f"\ndemo: {err}", file=sys.stderr)
        return 1
    print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
