"""`gopd-train` end to end on tiny models: multi-teacher run, learning, exact resume, bad input.

The tiny assets (models, converted checkpoints, prompts) are built once per session; every run is
a real `gopd-train` launch with local gloo ranks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
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
        (
            ["micro_batch_tokens=64"],
            "micro_batch_tokens=64 cannot hold one sequence of the configured length: data.max_prompt_length=64 "
            "+ rollout.max_new_tokens=16 = 80 tokens",
        ),
        (["scoring.micro_batch_tokens=79"], "scoring.micro_batch_tokens=79 cannot hold one sequence"),
        (["packing=on", "student.attention=local"], "packing=on, but the student"),
        (["packing=on", "scoring.teachers.code.model.attention=local"], "scoring.teachers.code.model.attention"),
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
        gopd_train(tiny_assets, out, "steps=2", "save_every=0", "student.tp=2", "student.pp=2", "micro_batch_tokens=80")
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
    for name, tokens in (("packed_small", 80), ("one_micro_batch", 8192)):  # 80: one 64 + 16-token sample
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
def test_a_stop_signal_during_start_up_is_honoured_at_the_first_step(tiny_assets, tmp_path):
    """A rank started with SIGTERM ignored (as torchrun starts its workers inside a Slurm step) and
    sent SIGTERM while it still imports and loads: the request must be neither lost nor fatal. It
    trains one step, checkpoints it and exits 0."""
    import signal
    import time

    out = tmp_path / "early"
    one_rank = (
        "scoring.teachers.math.model.tp=1",
        "scoring.teachers.math.model.pp=1",
        "scoring.teachers.code.model.tp=1",
        "scoring.references.math_base.pp=1",
    )
    cmd = train_command(tiny_assets, out, "steps=1000", "save_every=0", "export_hf=false", *one_rank, nproc=1)
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN),
    )
    time.sleep(1.5)  # parsing its arguments done, importing torch and megatron-core
    assert proc.poll() is None and not (out / "metrics.jsonl").exists()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    assert len(read_metrics(out)) == 1 and "stop signal received" in output
    assert (out / "checkpoints" / "step_000001" / "trainer_state.json").is_file()


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


# ----------------------------------------------------------------------------------------------
# Packed micro-batches (packing=auto/on) against right-padded ones (packing=off), in one launch of
# 2 gloo ranks: the trainer's own forward/backward and optimizer step on the same samples.

PACKING_CASES = {  # name: (tp, pp, loss.kind, student)
    "tp1": (1, 1, "sampled", "dense"),  # DP=2
    "tp1_topk": (1, 1, "topk", "dense"),
    "tp2": (2, 1, "sampled", "dense"),
    "pp2": (1, 2, "sampled", "dense"),
    # an MoE student under TP runs sequence parallel: s (padded) and t (packed) rounded to TP
    "tp2_moe_sp": (2, 1, "sampled", "moe"),
}
PACKING_BUDGET = 96  # several micro-batches per rank, of different shapes
LONG_LENGTHS = (5000, 3192)  # one 8K-token packed micro-batch per rank
# Peak resident-memory growth (measured ~240-260 MiB training, ~35-38 MiB scoring); local
# attention's fp32 scores alone would take 1 GiB per layer at 8K tokens.
LONG_TRAIN_MEMORY_BOUND = 512 * 2**20
LONG_SCORE_MEMORY_BOUND = 160 * 2**20


def _random_samples(seed: int, lengths: list[tuple[int, int]], vocab: int, topk: int) -> list:
    """TrainSamples of random tokens with plausible teacher / reference / sampler log-probs."""
    import torch

    from megatron_gopd.batching import TrainSample

    gen = torch.Generator().manual_seed(seed)
    samples = []
    for index, (prompt_len, response_len) in enumerate(lengths):
        tokens = torch.randint(0, vocab, (prompt_len + response_len,), generator=gen).tolist()
        teacher = torch.randn(response_len, vocab, generator=gen).log_softmax(-1)
        ref = torch.randn(response_len, vocab, generator=gen).log_softmax(-1)
        picked = torch.tensor(tokens[prompt_len:])[:, None]
        top = teacher.topk(topk, dim=-1) if topk else None
        samples.append(
            TrainSample(
                prompt_ids=tokens[:prompt_len],
                response_ids=tokens[prompt_len:],
                sampler_logprobs=(-torch.rand(response_len, generator=gen) * 5).tolist(),
                teacher_logprobs=teacher.gather(1, picked)[:, 0],
                ref_logprobs=ref.gather(1, picked)[:, 0] if index % 3 else None,
                teacher="math" if index % 3 else "code",  # code: plain OPD, no reference
                lam=1.25 if index % 3 else 1.0,
                outcome_advantage=0.1 * (index % 4) - 0.15,
                teacher_topk_ids=top.indices if top else None,
                teacher_topk_logprobs=top.values if top else None,
                ref_topk_logprobs=ref.gather(1, top.indices) if top and index % 3 else None,
            )
        )
    return samples


def _trainer_step(overrides: list[str], samples_for_dp_rank, world_size: int, measure: bool = False) -> dict:
    """Build the student of a tiny-config job as `Trainer` does and run one `_optimize` step."""
    import torch.distributed as dist

    from megatron_gopd.models import ModelArchitecture
    from megatron_gopd.testing.memory import PeakRSSGrowth
    from megatron_gopd.trainer.config import TrainPlan, student_packs
    from megatron_gopd.trainer.loop import Trainer

    cfg = load_config(TrainConfig, TINY_CONFIG, overrides)
    hf_dir = Path(cfg.student.checkpoint) / "hf"
    layout = cfg.student.layout
    plan = TrainPlan(
        world_size=world_size,
        student_checkpoint=cfg.student.checkpoint,
        arch=ModelArchitecture.from_pretrained(hf_dir),
        layout=layout,
        packed=student_packs(cfg),
    )
    trainer = Trainer(cfg, plan)
    # Trainer.setup's student half (no data, pool or rollout engine: the samples are given)
    trainer.init_parallel_state()
    trainer.pool = None
    trainer.static_gb = None
    trainer._build_student()
    trainer.model.train()
    samples = samples_for_dp_rank(trainer.dp_rank, trainer._topk)
    with PeakRSSGrowth() as growth:
        metrics = trainer._optimize(samples)
    grads = {n: p.main_grad.detach().clone() for n, p in trainer.model.module.named_parameters()}
    out = {
        "metrics": {k: v for k, v in metrics.items() if not k.startswith(("time/", "memory/"))},
        "grads": grads,
        "packed": plan.packed,
    }
    if measure:
        out.update(growth=growth.bytes, exact=growth.exact)
    dist.barrier()
    return out


def _packing_body(rank: int, world_size: int, overrides: list[str], long_checkpoint: str, moe_checkpoint: str) -> dict:
    from megatron_gopd.testing.tiny_tokenizer import TINY_VOCAB_SIZE

    report: dict = {}
    for name, (tp, pp, kind, student) in PACKING_CASES.items():

        def samples(dp_rank: int, topk: int) -> list:
            # odd and even totals: padded s and packed t need rounding to TP under sequence parallelism
            lengths = [(3 + (7 * i + 5 * dp_rank) % 30, 1 + (11 * i + 3 * dp_rank) % 41) for i in range(7)]
            return _random_samples(100 + dp_rank, lengths, TINY_VOCAB_SIZE, topk)

        case = [
            *overrides,
            *([f"student.checkpoint={moe_checkpoint}"] if student == "moe" else []),
            f"student.tp={tp}",
            f"student.pp={pp}",
            f"loss.kind={kind}",
            "loss.topk=8",
            f"micro_batch_tokens={PACKING_BUDGET}",
        ]
        runs = {mode: _trainer_step([*case, f"packing={mode}"], samples, world_size) for mode in ("auto", "off")}
        packed, padded = runs["auto"], runs["off"]
        grad_scale = max(g.abs().max().item() for g in padded["grads"].values())
        report[name] = dict(
            packed=(packed["packed"], padded["packed"]),
            metrics=(packed["metrics"], padded["metrics"]),
            grad_diff=max((packed["grads"][n] - g).abs().max().item() for n, g in padded["grads"].items()),
            grad_scale=grad_scale,
        )

    # One 8K-token packed micro-batch per rank (TP=1, DP=2): scored by the pool, then trained on.
    from megatron_gopd import platform
    from megatron_gopd.models import ParallelLayout
    from megatron_gopd.scoring import PoolModelConfig, ScoreRequest, ScoringConfig, ScoringPool, TeacherConfig
    from megatron_gopd.testing.memory import PeakRSSGrowth

    long_overrides = [
        *overrides,
        f"student.checkpoint={long_checkpoint}",
        "micro_batch_tokens=8192",
    ]

    def long_samples(dp_rank: int, topk: int) -> list:
        return _random_samples(7 + dp_rank, [(n // 2, n - n // 2) for n in LONG_LENGTHS], TINY_VOCAB_SIZE, topk)

    # Scoring first: it must not reuse memory that training's larger peak left in the heap.
    platform.init_model_parallel(tp=1, pp=1)  # the pool's student: TP=1, DP=2
    pool_cfg = ScoringConfig(
        teachers={"math": TeacherConfig(model=PoolModelConfig(long_checkpoint), domains=["math"])},
        micro_batch_tokens=8192,
    )
    pool = ScoringPool(pool_cfg, student_checkpoint=long_checkpoint, student_layout=ParallelLayout())
    # TP=1: every rank is its own replica
    requests = [ScoreRequest("math", s.prompt_ids, s.response_ids) for s in long_samples(rank, 0)]
    pool.score([ScoreRequest("math", requests[0].prompt_ids[:8], requests[0].response_ids[:8])], topk=4)  # warm
    with PeakRSSGrowth() as growth:
        scores = pool.score(requests, topk=4)
    stats = dict(vars(pool.stats["math"]))
    pool.close()
    trained = _trainer_step(long_overrides, long_samples, world_size, measure=True)
    report["long"] = dict(
        train_growth=trained["growth"],
        train_exact=trained["exact"],
        train_loss=trained["metrics"]["loss"],
        grads_finite=all(bool(g.isfinite().all()) for g in trained["grads"].values()),
        score_growth=growth.bytes,
        score_exact=growth.exact,
        scores_finite=all(bool(s.teacher_logprobs.isfinite().all()) for s in scores),
        scored_tokens=[len(s.teacher_logprobs) for s in scores],
        stats=stats,
    )
    return report


@pytest.fixture(scope="module")
def packing_reports(tiny_assets, tmp_path_factory) -> list[dict]:
    """Every packing check in one launch of 2 ranks; one report per rank."""
    from tests.dist_harness import run_distributed

    overrides = _asset_overrides(tiny_assets)
    # The tiny student with an 8K context (RoPE has no table to resize; nothing else depends on it).
    cfg = load_config(TrainConfig, TINY_CONFIG, overrides)
    long_checkpoint = tmp_path_factory.mktemp("long") / "student_8k"
    shutil.copytree(cfg.student.checkpoint, long_checkpoint)
    config_path = long_checkpoint / "hf" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "max_position_embeddings": 8192}))
    return run_distributed(
        _packing_body,
        world_size=2,
        timeout=900.0,
        overrides=overrides,
        long_checkpoint=str(long_checkpoint),
        moe_checkpoint=str(_tiny_moe_student(tmp_path_factory.mktemp("moe"))),
    )


def _tiny_moe_student(out: Path) -> Path:
    """A tiny Qwen3-MoE student checkpoint (no load-balancing loss: it would see the padding)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from megatron_gopd.testing.tiny_assets import tiny_qwen3_config
    from megatron_gopd.testing.tiny_tokenizer import build_tiny_tokenizer

    dense = tiny_qwen3_config().to_dict()
    fields = {k: dense[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")}
    fields.update({k: dense[k] for k in ("num_key_value_heads", "head_dim", "max_position_embeddings")})
    config = Qwen3MoeConfig(
        **fields,
        tie_word_embeddings=False,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        router_aux_loss_coef=0.0,
    )
    torch.manual_seed(5)
    hf_dir, checkpoint = out / "hf", out / "ckpt"
    Qwen3MoeForCausalLM(config).save_pretrained(hf_dir)
    build_tiny_tokenizer(save_dir=str(hf_dir))
    convert = [sys.executable, "-m", "megatron_gopd.cli", "gopd-convert", "hf-to-mcore"]
    subprocess.run([*convert, "--hf-dir", str(hf_dir), "--out", str(checkpoint)], check=True, timeout=300)
    return checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PACKING_CASES))
def test_packed_and_padded_micro_batches_train_alike(packing_reports, case):
    """The same samples, packed (packing=auto) or right-padded (packing=off): the same loss,
    metrics and gradients (fp32), at TP=1 (DP=2, sampled and top-k loss), TP=2, PP=2 and an MoE
    student at TP=2 (sequence parallel)."""
    for rank, report in enumerate(packing_reports):
        row = report[case]
        assert row["packed"] == (True, False), (rank, row["packed"])
        packed, padded = row["metrics"]
        assert packed.keys() == padded.keys() and "loss" in packed, (packed, padded)
        for key, value in padded.items():
            assert packed[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (rank, key, packed, padded)
        assert padded["grad_norm"] > 0
        assert row["grad_diff"] <= 1e-5 * row["grad_scale"], (rank, row["grad_diff"], row["grad_scale"])


@pytest.mark.slow
def test_an_8k_token_packed_micro_batch_scores_and_trains_within_a_memory_bound(packing_reports):
    """A tiny model scores (pool, top-k) and trains on one 8K-token packed micro-batch per rank
    within a bound on resident memory far below what local attention's [heads, t, t] fp32 scores
    take (1 GiB per layer)."""
    for rank, report in enumerate(packing_reports):
        long = report["long"]
        assert long["grads_finite"] and math.isfinite(long["train_loss"]), (rank, long)
        assert long["scores_finite"] and long["scored_tokens"] == [n - n // 2 for n in LONG_LENGTHS], (rank, long)
        assert long["stats"]["padded_tokens"] == long["stats"]["tokens"], long["stats"]  # packed: no padding
        assert long["train_growth"] < LONG_TRAIN_MEMORY_BOUND, (rank, long["train_growth"] / 2**20, long["train_exact"])
        assert long["score_growth"] < LONG_SCORE_MEMORY_BOUND, (rank, long["score_growth"] / 2**20, long["score_exact"])
