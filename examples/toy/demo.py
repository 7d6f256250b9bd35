#!/usr/bin/env python
"""The paper's finding in miniature, on CPU: students distilled from an RL teacher with on-policy
distillation (OPD, lam = 1) and reward extrapolation (ExOPD, lam > 1), against the teacher, SFT on
the teacher's samples and ExPO, with seed-level intervals.

    python examples/toy/demo.py                        # what `make demo` runs: one student seed
    python examples/toy/demo.py --loss topk sampled    # also the paper's sampled-token estimator
    # the README's table (five seeds, both objectives, lrs chosen on validation; `README_TABLE_ARGS`):
    python examples/toy/demo.py --seeds 1 2 3 4 5 --loss topk sampled --tune-lr 3e-4 1e-3 4e-3
    python examples/toy/demo.py --smoke                # every stage for 2 steps (what the tests run)

The task is two-digit addition with the answer in ``\\boxed{}``, checked by the math verifier. Every
stage runs a real command (`gopd-convert`, `gopd-train`, `gopd-eval`, `tools/expo.py`) whose log lands
in ``<out>/logs/``; a stage whose outputs exist is skipped, so a second run only redoes what is
missing (delete a stage's directory to redo it). The stages:

1. ``data``     three splits by unordered pair {a, b} (a sum and its commutative twin b + a always
                land in the same split): ``train`` (the RL / distillation pool, and the base's noisy
                SFT set drawn from it), ``val`` (every recipe choice is made here) and ``test``
                (reported only);
2. ``init``     a random tiny Qwen3 (char tokenizer) -> `gopd-convert hf-to-mcore`;
3. ``base``     `gopd-train mode=sft` on the noisy SFT set: an imperfect base;
4. ``teacher``  `gopd-train reward.only=true` from the base (GRPO-style RL on the verifier reward);
5. ``teacher_samples``  `gopd-eval --samples-out` of the teacher on the training pool;
6. ``students`` from the base, per seed (the run's seed and its data order, ``data.seed``): SFT on
                the teacher's samples, OPD (lam 1.0), ExOPD (lam 1.25, 1.5), all with the same prompts
                per step; per ``--loss`` kind its own recipe (`OPD_RECIPES`): ``topk`` minimises the
                exact reverse KL to the target over the whole vocabulary, ``sampled`` is the paper's
                sampled-token estimator, trained longer at a smaller lr;
7. ``expo``     `tools/expo.py`: base + alpha * (teacher - base), training-free, alpha 1.25 and 1.5;
8. ``eval``     `gopd-eval` avg@k at temperature 1.0 on the validation and the test split;
9. ``report``   ``results.json``, ``results.md`` (tables, also printed: test and validation avg@k per
                seed, and each model against the teacher and each ExOPD against OPD with a t-interval
                over seeds, a hierarchical bootstrap and the t-test's p, raw and Holm-adjusted over the
                table), ``plots/*.png`` and ``timings.json``.

The training recipe lives in ``examples/toy/configs/*.yaml``; this script fills in paths, seeds, lam
and the per-loss recipe. `benchmarks/bench_demo.py` reads ``timings.json``.
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


@dataclasses.dataclass(frozen=True)
class OpdRecipe:
    """How the OPD / ExOPD students of one ``loss.kind`` are trained (the rest is student_opd.yaml)."""

    steps: int
    lr: float
    """Peak learning rate (warmup, then cosine decay to the YAML's min_lr)."""
    warmup: int
    """Warmup steps."""


README_TABLE_ARGS = "--seeds 1 2 3 4 5 --loss topk sampled --tune-lr 3e-4 1e-3 4e-3"
"""The arguments the README's results table was produced with."""

OPD_RECIPES = {
    "topk": OpdRecipe(steps=80, lr=2e-3, warmup=30),
    # The sampled-token gradient is noisier than the exact one: more steps. Chosen on the validation
    # split (seed 1, mean avg@8 over lam 1 / 1.25 / 1.5): 200 steps at 3e-4 / 1e-3 / 4e-3 gave
    # 74.6 / 78.4 / 0.5 (4e-3 diverges), and the plain toy's 400 steps at 1e-4 gave 74.2.
    "sampled": OpdRecipe(steps=200, lr=1e-3, warmup=20),
}
"""Default recipe per loss kind; ``topk`` matches student_opd.yaml."""


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
    val_prompts: int = 256
    """Prompts of the validation split (recipe choices are made on its avg@k)."""
    test_prompts: int = 256
    """Prompts of the test split (reported, never used to choose anything)."""
    eval_k: int = 8
    eval_seed: int = 0
    max_new_tokens: int = 16
    steps: dict[str, int] = dataclasses.field(default_factory=dict)
    """Steps per training stage (``base``, ``teacher``, ``student``); empty: the YAML's, and for
    OPD / ExOPD students their loss kind's `OPD_RECIPES` entry."""
    hidden_size: int = 128
    num_layers: int = 4
    custom_student_steps: bool = False
    """Set by `--student-steps`: student runs get a ``_steps<N>`` suffix."""
    losses: tuple[str, ...] = ("topk",)
    """``loss.kind`` of the OPD / ExOPD students, one set of students (and table rows) per kind."""
    opd_lr: Optional[float] = None
    """Peak lr of every OPD / ExOPD student (`--opd-lr`); None: the loss kind's recipe."""
    opd_warmup: Optional[int] = None
    """Warmup steps of every OPD / ExOPD student (`--opd-warmup`); None: the loss kind's recipe."""
    tune_lrs: tuple[float, ...] = ()
    """`--tune-lr`: candidate peak lrs of the OPD / ExOPD students (the recipe's own is always one).
    Each trains the students of every lam on the first seed; the lr with the best mean validation
    avg@k over the lams trains every seed. The test split plays no part in the choice."""
    chosen_lrs: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per loss kind, the lr `--tune-lr` chose (filled in by the run)."""

    @property
    def student_tag(self) -> str:
        """Suffix of student run names when `--student-steps` overrides the recipe (so runs of
        different lengths sit side by side)."""
        return f"_steps{self.steps['student']}" if self.custom_student_steps else ""

    def opd_recipe(self, loss: str, lr: Optional[float] = None) -> OpdRecipe:
        """The OPD / ExOPD recipe of ``loss`` with this run's overrides applied (``lr``, else
        `--opd-lr`, else the lr `--tune-lr` chose, else the recipe's)."""
        recipe = OPD_RECIPES[loss]
        if lr is None:
            lr = self.opd_lr if self.opd_lr is not None else self.chosen_lrs.get(loss, recipe.lr)
        return OpdRecipe(
            steps=self.steps.get("student", recipe.steps),
            lr=lr,
            warmup=recipe.warmup if self.opd_warmup is None else self.opd_warmup,
        )

    def opd_tag(self, loss: str, lr: Optional[float] = None) -> str:
        """Suffix of the OPD / ExOPD run names of ``loss``: `student_tag`, ``_<kind>`` unless topk,
        and ``_lr<x>`` / ``_warmup<n>`` when overridden, so every recipe has runs of its own."""
        recipe, default = self.opd_recipe(loss, lr), OPD_RECIPES[loss]
        tag = self.student_tag + ("" if loss == "topk" else f"_{loss}")
        tag += f"_lr{recipe.lr:g}" if recipe.lr != default.lr else ""
        return tag + (f"_warmup{recipe.warmup}" if recipe.warmup != default.warmup else "")

    def opd_overrides(self, loss: str, lr: Optional[float] = None) -> list[str]:
        """Overrides of student_opd.yaml for the students of ``loss``."""
        recipe = self.opd_recipe(loss, lr)
        return [
            f"loss.kind={loss}",
            f"steps={recipe.steps}",
            f"optim.lr={recipe.lr}",
            f"optim.warmup_steps={recipe.warmup}",
        ]

    @classmethod
    def smoke(cls, out: Path) -> "DemoSettings":
        """Every stage for 2 steps on a handful of prompts (a test of the plumbing, not of the result)."""
        return cls(
            out=out,
            sft_examples=256,
            val_prompts=16,
            test_prompts=16,
            eval_k=2,
            hidden_size=64,
            num_layers=2,
            steps={"base": 2, "teacher": 2, "student": 2},
        )


# ----------------------------------------------------------------------------------------------
# Stage 1: data


def split_problems(val_size: int, test_size: int, seed: int = 0) -> dict[str, list[tuple[int, int]]]:
    """Every a + b with 10 <= a, b <= 99, split three ways by unordered pair {a, b}.

    ``test`` and ``val`` hold one sum per pair (its order drawn at random), so neither a test sum
    nor its commutative twin b + a appears in another split; ``train`` holds both orders of every
    remaining pair, shuffled.
    """
    pairs = [(a, b) for a in range(10, 100) for b in range(a, 100)]  # unordered: a <= b
    if val_size + test_size >= len(pairs):
        raise ValueError(
            f"val_prompts + test_prompts = {val_size + test_size} leaves no training pairs "
            f"(there are {len(pairs)} pairs {{a, b}})"
        )
    rng = random.Random(seed)
    rng.shuffle(pairs)

    def one_order(pair: tuple[int, int]) -> tuple[int, int]:
        return pair if rng.random() < 0.5 else (pair[1], pair[0])

    test = [one_order(p) for p in pairs[:test_size]]
    val = [one_order(p) for p in pairs[test_size : test_size + val_size]]
    train = [order for a, b in pairs[test_size + val_size :] for order in ([(a, b), (b, a)] if a != b else [(a, b)])]
    rng.shuffle(train)
    return {"train": train, "val": val, "test": test}


def wrong_answer(a: int, b: int, rng: random.Random) -> int:
    """A plausible slip: the carry dropped, or a digit off by one."""
    total = a + b
    no_carry = (a // 10 + b // 10) * 10 + (a + b) % 10  # tens added without the units' carry
    choices = [no_carry] if no_carry != total else []
    choices += [total + 1, total - 1, total + 10, total - 10]
    return rng.choice(choices)


def write_data(settings: DemoSettings, data_dir: Path) -> None:
    """train.jsonl (the RL / distillation prompt pool), base_sft.jsonl (noisy answers, drawn from the
    pool), val.jsonl and test.jsonl (`split_problems`)."""
    splits = split_problems(settings.val_prompts, settings.test_prompts)
    pool = splits["train"]
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
    for split in ("val", "test"):  # test last: the stage's completion marker
        write(data_dir / f"{split}.jsonl", [record(a, b) for a, b in splits[split]])


# ----------------------------------------------------------------------------------------------
# Stage 2: a random initial model


def write_initial_model(settings: DemoSettings, hf_dir: Path, seed: int = 0) -> None:
    """A random Qwen3-shaped model with the tiny character tokenizer, saved as a HF directory."""
    import torch
    import transformers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_gopd.testing.tiny_tokenizer import TINY_VOCAB_SIZE, build_tiny_tokenizer

    h = settings.hidden_size
    config = Qwen3Config(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=h,
        intermediate_size=3 * h,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=h // 4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
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
        self.timings: dict[str, float] = (
            json.loads(self.timings_path.read_text()) if self.timings_path.is_file() else {}
        )
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

    def command(self, name: str, argv: Sequence[str], progress: Optional[Path] = None, total_steps: int = 0) -> None:
        """Run one command, output to ``logs/<name>.log``; optionally show training progress."""
        log_path = self.logs / f"{name.replace('/', '_')}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(str(a) for a in argv) + "\n")
            log.flush()
            process = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
            stop = threading.Event()
            watcher = None
            if progress is not None and total_steps:
                watcher = threading.Thread(
                    target=_watch_steps, args=(progress, total_steps, self._prefix, stop), daemon=True
                )
                watcher.start()
            code = process.wait()
            stop.set()
            if watcher is not None:
                watcher.join()
        if code != 0:
            tail = log_path.read_text().splitlines()[-30:]
            raise RuntimeError(f"{name} failed (exit {code}); last lines of {_relative(log_path)}:\n" + "\n".join(tail))

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
    loss: Optional[str] = None
    """``loss.kind`` of an OPD / ExOPD student (its rows and comparisons stay with their kind)."""


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

    def _total_steps(self, config: str, stage: str) -> int:
        return self.s.steps.get(stage) or _recipe_value(config, "steps")

    def _train(
        self, name: str, config: str, stage: str, run_dir: Path, overrides: Sequence[str], steps: Optional[int] = None
    ) -> None:
        """`gopd-train` of ``config`` into ``run_dir``; ``steps`` (else the stage's) sets its length."""
        steps = steps or self._total_steps(config, stage)
        self.runner.stage(
            name,
            run_dir / "hf" / "config.json",
            lambda: self.runner.cli(
                name,
                "gopd-train",
                ["--config", CONFIGS / config, *self._nproc(), f"output_dir={run_dir}", f"steps={steps}", *overrides],
                progress=run_dir / "metrics.jsonl",
                total_steps=steps,
            ),
            what=f"gopd-train {config}",
        )

    def _convert(self, name: str, hf_dir: Path, ckpt: Path) -> None:
        self.runner.stage(
            name,
            ckpt / "gopd_checkpoint.json",
            lambda: self.runner.cli(name, "gopd-convert", ["hf-to-mcore", "--hf-dir", hf_dir, "--out", ckpt]),
            what="gopd-convert hf-to-mcore",
        )

    def _sample(
        self,
        name: str,
        model: Path,
        data: Path,
        k: int,
        seed: int,
        report: Path,
        samples: Path,
        extra: Sequence[str] = (),
    ) -> None:
        """`gopd-eval` at temperature 1, rendering prompts as training did (no thinking block)."""
        self.runner.cli(
            name,
            "gopd-eval",
            [
                "--model",
                model,
                "--data",
                data,
                "--k",
                str(k),
                "--temperature",
                "1.0",
                "--max-new-tokens",
                str(self.s.max_new_tokens),
                "--seed",
                str(seed),
                "--enable-thinking",
                "false",
                *extra,
                *self._nproc(),
                "--out",
                report,
                "--samples-out",
                samples,
            ],
        )

    def _evaluate(self, entry: ModelEntry, split: str) -> Path:
        """avg@k of ``entry`` on ``split`` (``val`` or ``test``): the report path (samples beside it)."""
        result = self.out / "eval" / split / f"{entry.key}.json"
        self.runner.stage(
            f"eval/{split}/{entry.key}",
            result,
            lambda: self._sample(
                f"eval_{split}_{entry.key}",
                entry.hf_dir,
                self.data / f"{split}.jsonl",
                self.s.eval_k,
                self.s.eval_seed,
                result,
                result.with_suffix(".samples.jsonl"),
            ),
            what=f"gopd-eval avg@{self.s.eval_k}",
        )
        return result

    # -- stages

    def run(self) -> dict:
        """Run (or skip) every stage and return the results table as a dict."""
        s, out = self.s, self.out
        out.mkdir(parents=True, exist_ok=True)
        r = self.runner
        print(f"megatron-gopd demo -> {_relative(out)} (seeds {list(s.seeds)}, {s.nproc} ranks)", flush=True)

        if (self.data / "eval.jsonl").exists():
            raise RuntimeError(
                f"{_relative(out)} holds a demo run from before the train / validation / test split "
                f"(data/eval.jsonl): its base and teacher trained on sums now in the test split; "
                f"delete it or use another --out"
            )
        r.stage("data", self.data / "test.jsonl", lambda: write_data(s, self.data), what="arithmetic prompts")
        init_hf = out / "init" / "hf"
        r.stage("init", init_hf / "config.json", lambda: write_initial_model(s, init_hf), what="random tiny Qwen3")
        self._convert("init/convert", init_hf, out / "init" / "mcore")

        base_run = out / "base"
        self._train(
            "base",
            "base_sft.yaml",
            "base",
            base_run,
            [
                f"student.checkpoint={out / 'init' / 'mcore'}",
                f"data.sources=[{{path: {self.data / 'base_sft.jsonl'}}}]",
            ],
        )
        base_ckpt = out / "base_mcore"
        self._convert("base/convert", base_run / "hf", base_ckpt)

        teacher_run = out / "teacher"
        self._train(
            "teacher",
            "teacher_grpo.yaml",
            "teacher",
            teacher_run,
            [f"student.checkpoint={base_ckpt}", f"data.sources=[{{path: {self.data / 'train.jsonl'}}}]"],
        )
        teacher_ckpt = out / "teacher_mcore"
        self._convert("teacher/convert", teacher_run / "hf", teacher_ckpt)

        # as many teacher samples as the SFT student sees prompts
        sft_prompts = self._total_steps("student_sft.yaml", "student") * _recipe_value(
            "student_sft.yaml", "prompts_per_step"
        )
        samples = out / "teacher_samples" / f"train_samples_{sft_prompts}.jsonl"
        r.stage(
            "teacher_samples",
            samples,
            lambda: self._sample(
                "teacher_samples",
                teacher_run / "hf",
                self.data / "train.jsonl",
                1,
                7,
                samples.with_suffix(".eval.json"),
                samples,
                extra=["--max-prompts", str(sft_prompts)],
            ),
            what="gopd-eval --samples-out",
        )

        tuning = [self._tune_lr(loss, base_ckpt, teacher_ckpt) for loss in s.losses] if s.tune_lrs else []

        entries = [
            ModelEntry("Base (noisy SFT)", "base", base_run / "hf", run_dir=base_run),
            ModelEntry("Teacher (RL)", "teacher", teacher_run / "hf", run_dir=teacher_run),
        ]
        for seed in s.seeds:
            seeding = _student_seeding(seed, base_ckpt)
            run = out / "students" / f"seed{seed}{s.student_tag}"
            self._train(
                f"students/seed{seed}{s.student_tag}/sft",
                "student_sft.yaml",
                "student",
                run / "sft",
                [*seeding, f"data.sources=[{{path: {samples}}}]"],
            )
            entries.append(
                ModelEntry(
                    "SFT on teacher samples",
                    f"sft_seed{seed}{s.student_tag}",
                    run / "sft" / "hf",
                    seed=seed,
                    run_dir=run / "sft",
                )
            )
            for loss in s.losses:
                for lam in OPD_LAMS:
                    entries.append(self._opd_student(seed, loss, lam, base_ckpt, teacher_ckpt))
        for alpha in EXPO_ALPHAS:
            expo_dir = out / "expo" / f"alpha{alpha:g}"
            r.stage(
                f"expo/alpha{alpha:g}",
                expo_dir / "config.json",
                lambda expo_dir=expo_dir, alpha=alpha: r.command(
                    f"expo_alpha{alpha:g}",
                    [
                        sys.executable,
                        TOOLS / "expo.py",
                        "--base",
                        base_run / "hf",
                        "--teacher",
                        teacher_run / "hf",
                        "--alpha",
                        str(alpha),
                        "--out",
                        expo_dir,
                    ],
                ),
                what="tools/expo.py",
            )
            entries.append(ModelEntry(f"ExPO (alpha={alpha:g})", f"expo_alpha{alpha:g}", expo_dir, alpha=alpha))

        evals = {split: {entry.key: self._evaluate(entry, split) for entry in entries} for split in ("val", "test")}
        from report import write_report  # examples/toy/report.py

        recipes = {loss: dataclasses.asdict(s.opd_recipe(loss)) for loss in s.losses}
        return write_report(
            out,
            entries,
            evals,
            self.runner.timings,
            eval_k=s.eval_k,
            seeds=s.seeds,
            recipes=recipes,
            splits={"val": s.val_prompts, "test": s.test_prompts},
            tuning=tuning,
        )

    def _opd_student(
        self, seed: int, loss: str, lam: float, base_ckpt: Path, teacher_ckpt: Path, lr: Optional[float] = None
    ) -> ModelEntry:
        """Train (or skip) the OPD / ExOPD student of ``seed``, ``loss``, ``lam`` (and ``lr``, else
        the recipe's) from the base, distilled from the teacher; its table entry."""
        s = self.s
        tag = s.opd_tag(loss, lr)
        opd_run = self.out / "students" / f"seed{seed}{tag}"
        key = f"{'opd' if lam == 1.0 else 'exopd'}_lam{lam:g}"
        self._train(
            f"students/seed{seed}{tag}/{key}",
            "student_opd.yaml",
            "student",
            opd_run / key,
            [
                *_student_seeding(seed, base_ckpt),
                f"scoring.teachers.arith.model.checkpoint={teacher_ckpt}",
                f"scoring.teachers.arith.lam={lam}",
                *s.opd_overrides(loss, lr),
                f"data.sources=[{{path: {self.data / 'train.jsonl'}}}]",
            ],
            steps=s.opd_recipe(loss, lr).steps,
        )
        label = "OPD (lam=1)" if lam == 1.0 else f"ExOPD (lam={lam:g})"
        return ModelEntry(
            label if loss == "topk" else f"{label}, {loss}",
            f"{key}_seed{seed}{tag}",
            opd_run / key / "hf",
            seed=seed,
            lam=lam,
            run_dir=opd_run / key,
            loss=loss,
        )

    def _tune_lr(self, loss: str, base_ckpt: Path, teacher_ckpt: Path) -> dict:
        """`--tune-lr` for ``loss``: the students of every lam on the first seed for each candidate
        lr, judged by their mean avg@k on the validation split alone; sets ``chosen_lrs[loss]``."""
        from report import avg_points, per_prompt_accuracy  # examples/toy/report.py

        s = self.s
        candidates = sorted(set(s.tune_lrs) | {OPD_RECIPES[loss].lr})
        val_avg: dict[float, list[float]] = {}
        for lr in candidates:
            val_avg[lr] = []
            for lam in OPD_LAMS:
                entry = self._opd_student(s.seeds[0], loss, lam, base_ckpt, teacher_ckpt, lr=lr)
                samples = self._evaluate(entry, "val").with_suffix(".samples.jsonl")
                val_avg[lr].append(avg_points(per_prompt_accuracy(samples)))
        # ties go to the smaller lr
        chosen = max(candidates, key=lambda lr: (sum(val_avg[lr]) / len(OPD_LAMS), -lr))
        s.chosen_lrs[loss] = chosen
        print(
            f"  lr for {loss}: {chosen:g} (mean validation avg@{s.eval_k} over lam "
            + ", ".join(f"{lr:g}: {sum(v) / len(v):.1f}" for lr, v in val_avg.items())
            + ")",
            flush=True,
        )
        return {
            "loss": loss,
            "seed": s.seeds[0],
            "lams": list(OPD_LAMS),
            "val_avg": {f"{lr:g}": v for lr, v in val_avg.items()},
            "chosen_lr": chosen,
        }


def _student_seeding(seed: int, base_ckpt: Path) -> list[str]:
    """Overrides of every student of ``seed``: the seed sets its rollouts and its data order alike,
    and it starts from the base."""
    return [f"seed={seed}", f"data.seed={seed}", f"student.checkpoint={base_ckpt}"]


def _recipe_value(config: str, key: str):
    import yaml

    return yaml.safe_load((CONFIGS / config).read_text())[key]


# ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> DemoSettings:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default outputs/demo, outputs/demo_smoke with --smoke)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="student training seeds (default 1)")
    parser.add_argument("--nproc", type=int, default=None, help="CPU ranks per command (default 2)")
    parser.add_argument(
        "--noise", type=float, default=None, help="share of wrong answers in the base's SFT data (default 0.3)"
    )
    parser.add_argument(
        "--noise-kind",
        choices=["slips", "carry"],
        default=None,
        help="slips: dropped carries and off-by-one digits (default); carry: only dropped carries",
    )
    parser.add_argument(
        "--student-steps",
        type=int,
        default=None,
        help="training steps of every student, SFT and OPD / ExOPD of every --loss (default: "
        "student_sft.yaml's, and each loss kind's recipe); the runs get a _steps<N> suffix",
    )
    parser.add_argument(
        "--loss",
        choices=sorted(OPD_RECIPES),
        nargs="+",
        default=None,
        help="objective(s) of the OPD / ExOPD students, one set of rows each: topk = exact reverse "
        f"KL to the G-OPD target over the whole (tiny) vocabulary ({OPD_RECIPES['topk']}, the "
        "default), sampled = the paper's sampled-token policy gradient "
        f"({OPD_RECIPES['sampled']})",
    )
    parser.add_argument(
        "--opd-lr",
        type=float,
        default=None,
        help="peak lr of the OPD / ExOPD students (default: the loss kind's recipe); for tuning "
        "on the validation split, in runs of their own (_lr<x>)",
    )
    parser.add_argument(
        "--opd-warmup",
        type=int,
        default=None,
        help="warmup steps of the OPD / ExOPD students (default: the loss kind's recipe); runs "
        "of their own (_warmup<n>)",
    )
    parser.add_argument(
        "--tune-lr",
        type=float,
        nargs="+",
        default=None,
        metavar="LR",
        help="candidate peak lrs of the OPD / ExOPD students, besides the recipe's: each trains the "
        "students of every lam on the first seed, and the lr with the best mean validation avg@k "
        "trains every seed (the choice and the validation figures go into results.md)",
    )
    parser.add_argument("--smoke", action="store_true", help="2 steps per stage on tiny data")
    args = parser.parse_args(argv)
    settings = (
        DemoSettings.smoke(args.out or REPO / "outputs" / "demo_smoke")
        if args.smoke
        else DemoSettings(out=args.out or REPO / "outputs" / "demo")
    )
    if args.seeds:
        settings.seeds = tuple(args.seeds)
    if args.nproc:
        settings.nproc = args.nproc
    if args.noise is not None:
        settings.noise = args.noise
    if args.noise_kind:
        settings.noise_kind = args.noise_kind
    if args.loss:
        settings.losses = tuple(dict.fromkeys(args.loss))
    settings.opd_lr = args.opd_lr
    if args.tune_lr:
        if args.opd_lr is not None:
            parser.error("--tune-lr chooses the lr itself: drop --opd-lr")
        settings.tune_lrs = tuple(args.tune_lr)
    settings.opd_warmup = args.opd_warmup
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
    if len(settings.seeds) < 2:
        print(
            "one student seed: the intervals above are over prompts alone and leave the seed-to-seed variance "
            f"out; the README's table comes from `{README_TABLE_ARGS}` (README, the demo)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
