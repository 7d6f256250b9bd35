"""`gopd-train` end to end on tiny models: multi-teacher run, learning, exact resume, bad input.

The tiny assets (models, converted checkpoints, prompts) are built once per session; every run is
a real `gopd-train` launch with local gloo ranks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gopd.config import load_config
from megatron_gopd.trainer import TrainConfig
from megatron_gopd.trainer.memory import plan_train_memory

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "examples" / "configs" / "tiny_multi_teacher.yaml"
# Timings differ between runs; everything else must not.
NONDETERMINISTIC = ("time/", "tokens_per_s")


def _asset_overrides(assets: Path) -> list[str]:
    """Point the tiny example config at this session's assets."""
    text = TINY_CONFIG.read_text().replace("outputs/tiny_assets", str(assets))
    cfg = load_config(TrainConfig, _write(assets.parent / "tiny.yaml", text))
    return [
        f"student.checkpoint={cfg.student.checkpoint}",
        f"scoring.teachers.math.model.checkpoint={cfg.scoring.teachers['math'].model.checkpoint}",
        f"scoring.teachers.code.model.checkpoint={cfg.scoring.teachers['code'].model.checkpoint}",
        f"scoring.references.math_base.checkpoint={cfg.scoring.references['math_base'].checkpoint}",
        f"data.sources=[{{path: {assets}/data/math.jsonl, share: 1.0}}, "
        f"{{path: {assets}/data/code.jsonl, share: 1.0}}]",
    ]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def train_command(
    assets: Path, output_dir: Path, *overrides: str, nproc: int = 4, config: Path = TINY_CONFIG
) -> list[str]:
    """The `gopd-train` command line of a tiny-config run on this session's assets."""
    return [
        sys.executable,
        "-m",
        "megatron_gopd.cli",
        "gopd-train",
        "--config",
        str(config),
        "--nproc",
        str(nproc),
        f"output_dir={output_dir}",
        *_asset_overrides(assets),
        *overrides,
    ]


def gopd_train(
    assets: Path, output_dir: Path, *overrides: str, nproc: int = 4, config: Path = TINY_CONFIG
) -> subprocess.CompletedProcess:
    cmd = train_command(assets, output_dir, *overrides, nproc=nproc, config=config)
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def comparable(metrics: list[dict]) -> list[dict]:
    """Metrics without the timing fields (which differ between equal runs)."""
    return [{k: v for k, v in m.items() if not k.startswith(NONDETERMINISTIC)} for m in metrics]


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"gopd-train failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.mark.slow
def test_multi_teacher_run_on_four_ranks(tiny_assets, tmp_path):
    """Student TP=1 x DP=4; math teacher TP=2/PP=2 with its base as reference; code teacher TP=2."""
    out = tmp_path / "run"
    _ok(gopd_train(tiny_assets, out, "steps=3", "save_every=0"))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        for name, value in m.items():
            assert math.isfinite(value), (name, value)
        assert m["response_length/mean"] > 0 and m["grad_norm"] > 0
    # both domains were routed to their own teacher, and reward correction produced an implicit reward
    seen = {k for m in metrics for k in m}
    assert {"reverse_kl/math", "reverse_kl/code", "implicit_reward/math", "implicit_reward/code"} <= seen
    assert (out / "checkpoints" / "step_000003" / "trainer_state.json").is_file()
    # gopd-train --plan's static state (parameters, gradient buffer, Adam, pool models of the most
    # loaded rank) against what the ranks measured holding
    cfg = load_config(TrainConfig, out / "config.yaml")
    planned = plan_train_memory(cfg, world_size=4, device_gb=24.0)
    planned_static = planned.static.total - planned.static.items["CUDA context / communication"]
    measured = metrics[0]["memory/static_gb"] * 1e9
    assert abs(planned_static - measured) <= 0.25 * measured, (planned_static, measured, planned.table())
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "hf")  # the exported student loads


TWO_RANKS = ("scoring.teachers.math.model.pp=1",)  # the tiny config's TP2 x PP2 teacher needs 4 ranks


@pytest.mark.slow
def test_reverse_kl_to_the_teachers_falls(tiny_assets, tmp_path):
    """Plain OPD (lam = 1): the student moves towards both teachers."""
    out = tmp_path / "opd"
    _ok(
        gopd_train(
            tiny_assets,
            out,
            "steps=16",
            "save_every=0",
            "export_hf=false",
            "optim.lr=3e-3",
            "optim.warmup_steps=0",
            "prompts_per_step=16",
            "scoring.teachers.math.lam=1.0",
            "scoring.teachers.code.lam=1.0",
            *TWO_RANKS,
            nproc=2,
        )
    )
    metrics = read_metrics(out)
    kl = [(m["reverse_kl/math"] + m["reverse_kl/code"]) / 2 for m in metrics]
    first, last = sum(kl[:4]) / 4, sum(kl[-4:]) / 4
    assert last < 0.85 * first, kl


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(tiny_assets, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("save_every=2", "export_hf=false", *TWO_RANKS)
    _ok(gopd_train(tiny_assets, straight, "steps=4", *common, nproc=2))
    _ok(gopd_train(tiny_assets, resumed, "steps=2", *common, nproc=2))
    # a save that was killed mid-write leaves only a hidden temporary directory: it must be ignored
    junk = resumed / "checkpoints" / ".step_000003.tmp-killed"
    junk.mkdir()
    (junk / "half_written.distcp").write_bytes(b"\0" * 10)
    # ... and a kill mid-write of metrics.jsonl leaves a torn last line: dropped on resume
    with open(resumed / "metrics.jsonl", "a") as metrics_file:
        metrics_file.write('{"step": 3, "loss": 0.12')
    result = gopd_train(tiny_assets, resumed, "steps=4", *common, nproc=2)
    _ok(result)
    assert "resumed from" in result.stderr and "step_000002" in result.stderr
    assert not junk.exists() and "torn last line" in result.stderr

    assert comparable(read_metrics(resumed)) == comparable(read_metrics(straight))


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "unknown key (did you mean 'optim.lr'?)"),
        (["steps=two"], "'steps' (command-line override): expected an integer"),
        (["student.checkpoint=/does/not/exist"], "is not a megatron-gopd checkpoint"),
        (["student.tp=3"], "num_attention_heads=4 is not divisible by tensor_parallel=3"),
        (["scoring.teachers.math.model.tp=3"], "tp x pp = 3 x 2 = 6 does not divide the world size 4"),
        (["scoring.teachers.math.domains=[]"], "math"),
        (["loss.kind=topk", "reward.only=true"], "loss.kind=topk distils the teachers' distributions"),
        (["loss.kind=topk", "loss.topk=0"], "loss.topk must be >= 1"),
        (
            ["rollout.temperature=0.7"],
            "rollout temperature=0.7: training rollouts must be drawn from the student's own",
        ),
        (["rollout.top_p=0.9", "rollout.top_k=5"], "rollout top_p=0.9, top_k=5: training rollouts"),
        (["loss.tis_cap=0"], "loss.tis_cap must be > 0 or null"),
        (["rollout.max_new_tokens=1000000"], "leaves no room for a prompt in the student's context"),
        (["data.max_prompt_length=1000000"], "data.max_prompt_length=1000000 + rollout.max_new_tokens="),
        (["optim.lr=nan"], "optim.lr must be a finite number"),
        (["keep_checkpoints=0"], "keep_checkpoints must be >= 1"),
        (["output_dir=/proc/gopd-never"], "cannot write under /proc"),
    ],
)
def test_bad_input_fails_fast_without_output(tiny_assets, tmp_path, overrides, message):
    out = tmp_path / "never"
    result = gopd_train(tiny_assets, out, *overrides)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr, result.stderr[-3000:]
    assert not out.exists()


@pytest.mark.slow
def test_empty_dataset_is_rejected(tiny_assets, tmp_path):
    empty = _write(tmp_path / "empty.jsonl", "")
    out = tmp_path / "never"
    result = gopd_train(tiny_assets, out, f"data.sources=[{{path: {empty}}}]")
    assert result.returncode == 2 and "empty" in result.stderr.lower(), result.stderr[-3000:]
    assert not out.exists()


@pytest.mark.slow
def test_stop_signal_checkpoints_and_the_same_command_resumes(tiny_assets, tmp_path):
    """What a Slurm time limit does: SIGUSR1 to the workers -> checkpoint, exit 0; rerun -> resume."""
    import signal
    import time

    import psutil

    out = tmp_path / "signalled"
    args = ("steps=30", "save_every=0", "export_hf=false", *TWO_RANKS)
    cmd = train_command(tiny_assets, out, *args, nproc=2)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    for worker in psutil.Process(proc.pid).children():  # the ranks the launcher started
        if "gopd-train" in " ".join(worker.cmdline()):
            worker.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    stopped_at = len(read_metrics(out))
    assert 2 <= stopped_at < 30 and "stop signal received" in output
    assert (out / "checkpoints" / f"step_{stopped_at:06d}" / "trainer_state.json").is_file()
    _ok(gopd_train(tiny_assets, out, "steps=" + str(stopped_at + 2), *args[1:], nproc=2))
    assert [m["step"] for m in read_metrics(out)] == list(range(1, stopped_at + 3))


@pytest.mark.slow
def test_two_node_loopback_run_equals_a_single_node_run(tiny_assets, tmp_path):
    """examples/launch: two torchrun agents on loopback (1 rank each) vs one agent with 2 ranks."""
    import socket

    args = [*_asset_overrides(tiny_assets), "steps=2", "save_every=0", "export_hf=false", *TWO_RANKS]
    env = {
        **os.environ,
        "CONFIG": str(TINY_CONFIG),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    launch = REPO / "examples" / "launch"
    single = tmp_path / "single"
    _ok(
        subprocess.run(
            ["bash", str(launch / "torchrun_single_node.sh"), *args, f"output_dir={single}"],
            env={**env, "NPROC_PER_NODE": "2"},
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
        )
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    multi = tmp_path / "multi"
    nodes = [
        subprocess.Popen(
            ["bash", str(launch / "torchrun_multi_node.sh"), *args, f"output_dir={multi}"],
            env={
                **env,
                "NNODES": "2",
                "NODE_RANK": str(rank),
                "NPROC_PER_NODE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        output, _ = node.communicate(timeout=600)
        assert node.returncode == 0, output[-3000:]

    assert comparable(read_metrics(multi)) == comparable(read_metrics(single))


@pytest.mark.slow
def test_sft_baseline_fits_teacher_responses(tiny_assets, tmp_path):
    """mode=sft: cross-entropy on the records' responses; the loss (NLL per token) falls."""
    out = tmp_path / "sft"
    _ok(
        gopd_train(
            tiny_assets,
            out,
            "mode=sft",
            "steps=8",
            "save_every=0",
            "export_hf=false",
            "optim.lr=3e-3",
            "optim.warmup_steps=0",
            f"data.sources=[{{path: {tiny_assets}/data/math_sft.jsonl}}]",
            *TWO_RANKS,
            nproc=2,
        )
    )
    losses = [m["loss"] for m in read_metrics(out)]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses


@pytest.mark.slow
def test_sft_needs_responses(tiny_assets, tmp_path):
    result = gopd_train(
        tiny_assets, tmp_path / "never", "mode=sft", f"data.sources=[{{path: {tiny_assets}/data/math.jsonl}}]"
    )
    assert result.returncode == 2 and "has no 'response' field" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_pipelined_tensor_parallel_student(tiny_assets, tmp_path):
    """The student itself at TP=2 x PP=2 (micro-batches of different shapes through the pipeline)."""
    out = tmp_path / "tp2pp2"
    _ok(
        gopd_train(tiny_assets, out, "steps=2", "save_every=0", "student.tp=2", "student.pp=2", "micro_batch_tokens=64")
    )
    metrics = read_metrics(out)
    assert len(metrics) == 2 and all(math.isfinite(v) for m in metrics for v in m.values())
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "hf")


@pytest.mark.slow
def test_hidden_state_logprob_path_equals_the_logits_path(tiny_assets, tmp_path):
    """loss.logprobs_from_hidden (no full-vocabulary logits) trains exactly like GPTModel's logits, TP=2."""
    runs = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        _ok(
            gopd_train(
                tiny_assets,
                out,
                "steps=2",
                "save_every=0",
                "export_hf=false",
                "student.tp=2",
                f"loss.logprobs_from_hidden={flag}",
                *TWO_RANKS,
                nproc=2,
            )
        )
        runs[flag] = read_metrics(out)
    for hidden, logits in zip(runs["true"], runs["false"]):
        for name in ("loss", "grad_norm", "entropy", "reverse_kl/math", "reverse_kl/code"):
            if name in logits:
                assert hidden[name] == pytest.approx(logits[name], rel=1e-4, abs=1e-5), name


@pytest.mark.slow
def test_topk_loss_is_zero_when_the_target_is_the_student(tiny_assets, tmp_path):
    """Teacher = reference = the student's own weights: q = pi_student at any lam, so before the first
    update the top-k KL over the whole vocabulary is 0 exactly when the teacher's top-k ids, the
    reference's log-probs of them and the student's are aligned position by position (TP=2 student,
    TP=2 teacher, reference at the student's layout)."""
    out = tmp_path / "self"
    student = f"{tiny_assets}/ckpt/student"
    _ok(
        gopd_train(
            tiny_assets,
            out,
            "steps=1",
            "save_every=0",
            "export_hf=false",
            "student.tp=2",
            "loss.kind=topk",
            "loss.topk=100000",
            *TWO_RANKS,
            f"scoring.teachers.math.model.checkpoint={student}",
            "scoring.teachers.math.lam=2.0",
            "scoring.teachers.math.reference=student_init",
            f"scoring.teachers.code.model.checkpoint={student}",
            "scoring.teachers.code.lam=1.0",
            nproc=2,
        )
    )
    (metrics,) = read_metrics(out)
    for teacher in ("math", "code"):
        assert abs(metrics[f"target_kl/{teacher}"]) < 1e-5, metrics
        assert abs(metrics[f"reverse_kl/{teacher}"]) < 1e-5, metrics
    assert metrics["loss"] == pytest.approx(0.0, abs=1e-5) and metrics["grad_norm"] < 1e-3, metrics


@pytest.mark.slow
def test_topk_loss_moves_the_student_towards_the_extrapolated_target(tiny_assets, tmp_path):
    """loss.kind=topk with k = 8 of the vocabulary (a tail bucket), ExOPD lam = 1.25: the KL falls."""
    out = tmp_path / "topk"
    _ok(
        gopd_train(
            tiny_assets,
            out,
            "steps=12",
            "save_every=0",
            "export_hf=false",
            "optim.lr=3e-3",
            "optim.warmup_steps=0",
            "prompts_per_step=16",
            "loss.kind=topk",
            "loss.topk=8",
            *TWO_RANKS,
            nproc=2,
        )
    )
    metrics = read_metrics(out)
    assert all(math.isfinite(v) for m in metrics for v in m.values())
    kl = [(m["target_kl/math"] + m["target_kl/code"]) / 2 for m in metrics]
    assert sum(kl[-3:]) / 3 < 0.7 * sum(kl[:3]) / 3, kl


@pytest.mark.slow
def test_sequence_mean_normalisation_is_exact_under_micro_batching_on_two_data_parallel_ranks(tiny_assets, tmp_path):
    """loss.agg=seq-mean-token-mean (the official runs' aggregation): the same rollouts (same seeds, DP=2)
    packed into many small micro-batches or one per rank give the same step loss and gradient."""
    runs = {}
    for name, tokens in (("packed_small", 48), ("one_micro_batch", 8192)):
        out = tmp_path / name
        _ok(
            gopd_train(
                tiny_assets,
                out,
                "steps=2",
                "save_every=0",
                "export_hf=false",
                "loss.agg=seq-mean-token-mean",
                f"micro_batch_tokens={tokens}",
                *TWO_RANKS,
                nproc=2,
            )
        )
        runs[name] = read_metrics(out)
    for small, one in zip(runs["packed_small"], runs["one_micro_batch"]):
        for key in ("loss", "grad_norm", "entropy", "reverse_kl/math"):
            assert small[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), (key, small, one)


@pytest.mark.slow
def test_biased_rollouts_train_when_explicitly_allowed(tiny_assets, tmp_path):
    """rollout.allow_biased_sampling=true lets a truncated, cooled sampler through (one step)."""
    out = tmp_path / "biased"
    _ok(
        gopd_train(
            tiny_assets,
            out,
            "steps=1",
            "save_every=0",
            "export_hf=false",
            "rollout.temperature=0.7",
            "rollout.top_k=5",
            "rollout.allow_biased_sampling=true",
            *TWO_RANKS,
            nproc=2,
        )
    )
    assert math.isfinite(read_metrics(out)[0]["loss"])


def _start_in_own_session(tiny_assets, out, *args):
    cmd = train_command(tiny_assets, out, *args, nproc=2)
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _wait_for_lines(proc, path: Path, lines: int, timeout_s: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.read_text().count("\n") >= lines):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.5)


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_checkpoints_and_exits_cleanly(tiny_assets, tmp_path):
    """What a scheduler does at a time limit or preemption: SIGTERM to every process of the job (the
    launcher, the ranks and the checkpoint's forked file writers) after a first checkpoint. The
    stop checkpoint must complete, the job exit 0, no process survive, and a second job on the same
    output_dir be refused while the first one lives."""
    import signal

    import psutil

    out = tmp_path / "preempted"
    # far more steps than can run before the signal, however fast the machine
    args = ("steps=1000", "save_every=2", "keep_checkpoints=5", "export_hf=false", *TWO_RANKS)
    proc = _start_in_own_session(tiny_assets, out, *args)
    _wait_for_lines(proc, out / "metrics.jsonl", 3)  # step 2's checkpoint exists
    second = gopd_train(tiny_assets, out, *args, nproc=2)
    assert second.returncode == 2 and "is in use by another gopd-train job" in second.stderr, second.stderr[-2000:]
    job = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    stopped_at = len(read_metrics(out))
    assert 3 <= stopped_at < 1000 and "stop signal received" in output
    assert (out / "checkpoints" / f"step_{stopped_at:06d}" / "trainer_state.json").is_file()
    _, alive = psutil.wait_procs(job, timeout=15)
    assert not alive, [p.cmdline() for p in alive]
    _ok(gopd_train(tiny_assets, out, f"steps={stopped_at + 1}", *args[1:], nproc=2))  # resumes


@pytest.mark.slow
def test_ranks_do_not_outlive_a_killed_launcher(tiny_assets, tmp_path):
    """kill -9 of `gopd-train --nproc 2`: its ranks stop (they get SIGTERM: a stop checkpoint) and
    release the output directory; nothing keeps running or writing."""
    import signal
    import time

    import psutil

    out = tmp_path / "orphans"
    proc = _start_in_own_session(tiny_assets, out, "steps=1000", "save_every=0", "export_hf=false", *TWO_RANKS)
    _wait_for_lines(proc, out / "metrics.jsonl", 1)
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive, [p.cmdline() for p in alive]
    stopped_at = len(read_metrics(out))
    assert (out / "checkpoints" / f"step_{stopped_at:06d}" / "trainer_state.json").is_file()
    time.sleep(1)
    assert len(read_metrics(out)) == stopped_at  # nothing writes after the ranks are gone


@pytest.mark.slow
def test_fast_and_megatron_rollout_engines_train_alike(tiny_assets, tmp_path):
    """rollout.engine=fast (the default where it applies) samples the same tokens as the reference
    engine (same per-sample streams), so two steps of training report the same metrics."""
    runs = {}
    for engine in ("fast", "megatron"):
        out = tmp_path / engine
        result = gopd_train(
            tiny_assets,
            out,
            "steps=2",
            "save_every=0",
            "export_hf=false",
            f"rollout.engine={engine}",
            *TWO_RANKS,
            nproc=2,
        )
        _ok(result)
        runs[engine] = read_metrics(out)
    for fast, reference in zip(runs["fast"], runs["megatron"]):
        for key in ("response_length/mean", "loss", "grad_norm", "reverse_kl/math", "entropy"):
            assert fast[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), (key, fast, reference)
