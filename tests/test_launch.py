"""The launchers in examples/launch/ and the Slurm templates in examples/slurm/, run for real.

The job the launchers run here is examples/toy/parallel_smoke.py (through GOPD_ENTRY): the
quickest real Megatron job, on a world of 2. Tiers: syntax and resolved command lines (fast, no
processes but bash); real torchrun runs on loopback (slow: 15-45 s each on 2 cores); one real sbatch
job, skipped unless a Slurm controller answers here (tools/slurm_localhost.sh starts one;
tools/slurm_check.sh is the full Slurm end-to-end check, with checkpoint-requeue-resume).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "examples" / "launch"
SLURM = REPO / "examples" / "slurm"
SMOKE = "examples/toy/parallel_smoke.py"
SMOKE_OK = re.compile(r"parallel smoke test: OK \(max logit difference (\S+)")
SCRIPTS = sorted(
    [*LAUNCH.glob("*.sh"), *SLURM.glob("*.sh"), *SLURM.glob("*.sbatch"), *(REPO / "tools").glob("slurm_*.sh")]
)
TEMPLATES = sorted(SLURM.glob("*.sbatch"))
RUN_TIMEOUT_S = 240


def _env(**extra: str) -> dict[str, str]:
    """This environment without any torchrun/Slurm placement, with the venv's torchrun on PATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "PET_", "TORCHELASTIC_"))
        and k
        not in {
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "CONFIG",
            "GOPD_ENTRY",
            "OUTPUT_DIR",
            "GOPD_DRY_RUN",
        }
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bash(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args], cwd=REPO, env=_env(**env), text=True, capture_output=True, timeout=60
    )


def _dry_run(script: Path, *args: str, **env: str) -> list[list[str]]:
    """The command lines a launcher or template would run, each split as the shell would."""
    result = _bash(script, *args, GOPD_DRY_RUN="1", **env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


class _Agents:
    """Launcher processes started together; stopped (whole process groups) if a test fails."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, script: Path, *args: str, **env: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            ["bash", str(script), *args],
            cwd=REPO,
            env=_env(**env),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def finish(self) -> list[tuple[int, str]]:
        """Every launcher's exit code and output, waiting RUN_TIMEOUT_S for all of them."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        results = []
        for proc in self.procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out))
        return results

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def agents():
    started = _Agents()
    yield started
    started.kill()


def _smoke_result(outputs: list[tuple[int, str]]) -> str:
    """Asserts every agent exited 0 and exactly one printed the smoke verdict; returns its number."""
    for code, out in outputs:
        assert code == 0, out[-4000:]
    verdicts = [m.group(1) for _, out in outputs for m in SMOKE_OK.finditer(out)]
    assert len(verdicts) == 1, "\n=====\n".join(out[-3000:] for _, out in outputs)
    return verdicts[0]


# ----------------------------------------------------------------------------------------------
# Syntax and resolved command lines


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_parses(script: Path):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean():
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_single_node_command_line():
    (cmd,) = _dry_run(LAUNCH / "torchrun_single_node.sh", "optim.lr=1e-5", CONFIG="cfg.yaml", NPROC_PER_NODE="8")
    assert cmd == [
        "torchrun",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "8",
        "--no-python",
        "gopd-train",
        "--config",
        "cfg.yaml",
        "optim.lr=1e-5",
    ]
    (cmd,) = _dry_run(
        LAUNCH / "torchrun_single_node.sh",
        "--seq-len",
        "16",
        GOPD_ENTRY=SMOKE,
        GPUS_PER_NODE="2",
        TORCHRUN_ARGS="--max-restarts 1",
    )
    assert cmd == [
        "torchrun",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        SMOKE,
        "--seq-len",
        "16",
    ]


def test_multi_node_command_lines():
    (static,) = _dry_run(
        LAUNCH / "torchrun_multi_node.sh",
        CONFIG="cfg.yaml",
        NNODES="4",
        NODE_RANK="3",
        MASTER_ADDR="node0",
        MASTER_PORT="1234",
        GPUS_PER_NODE="8",
    )
    assert static == [
        "torchrun",
        "--nnodes",
        "4",
        "--nproc-per-node",
        "8",
        "--node-rank",
        "3",
        "--master-addr",
        "node0",
        "--master-port",
        "1234",
        "--no-python",
        "gopd-train",
        "--config",
        "cfg.yaml",
    ]
    (c10d,) = _dry_run(
        LAUNCH / "torchrun_multi_node.sh",
        CONFIG="cfg.yaml",
        NNODES="2",
        RDZV_ENDPOINT="node0:29400",
        RDZV_ID="run42",
        NPROC_PER_NODE="4",
    )
    assert c10d[:8] == [
        "torchrun",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "4",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
    ]
    assert c10d[8:12] == ["node0:29400", "--rdzv-id", "run42", "--rdzv-conf"]
    # Under srun the node rank and count come from Slurm.
    (under_srun,) = _dry_run(
        LAUNCH / "torchrun_multi_node.sh", CONFIG="c.yaml", SLURM_NNODES="3", SLURM_NODEID="2", NPROC_PER_NODE="1"
    )
    assert under_srun[1:3] == ["--nnodes", "3"] and under_srun[5:7] == ["--node-rank", "2"]


def test_launchers_refuse_what_cannot_run():
    missing_config = _bash(LAUNCH / "torchrun_single_node.sh", GOPD_DRY_RUN="1")
    assert missing_config.returncode != 0 and "set CONFIG" in missing_config.stderr
    bad_rank = _bash(LAUNCH / "torchrun_multi_node.sh", CONFIG="c.yaml", NNODES="2", NODE_RANK="2", GOPD_DRY_RUN="1")
    assert bad_rank.returncode != 0 and "NODE_RANK=2 must be below NNODES=2" in bad_rank.stderr


def test_launcher_environment():
    """The NCCL/CUDA defaults are exported, and a user's own value wins."""
    probe = (
        "source examples/launch/common.sh; gopd_export_env 2; "
        "echo $CUDA_DEVICE_MAX_CONNECTIONS $NCCL_IB_TIMEOUT $OMP_NUM_THREADS $PET_SIGNALS_TO_HANDLE"
    )
    out = subprocess.run(
        ["bash", "-c", probe], cwd=REPO, env=_env(NCCL_IB_TIMEOUT="19"), text=True, capture_output=True, check=True
    ).stdout.split()
    assert out[0] == "1" and out[1] == "19" and int(out[2]) >= 1
    assert out[3].endswith(",SIGUSR1")


_FAKE_JOB = dict(
    SLURM_JOB_ID="4242",
    SLURM_JOB_NAME="gopd",
    SLURM_NNODES="2",
    SLURM_JOB_NODELIST="gpu[07-08]",
    SLURM_CPUS_ON_NODE="96",
    SLURM_SUBMIT_DIR=str(REPO),
)


def test_multi_node_template_command_lines():
    srun, torchrun = _dry_run(
        SLURM / "multi_node.sbatch", "rollout.n=2", CONFIG="cfg.yaml", GPUS_PER_NODE="8", **_FAKE_JOB
    )
    out_dir = f"{REPO}/outputs/gopd-4242"
    assert srun[:3] == ["srun", "--kill-on-bad-exit=1", f"--output={out_dir}/logs/attempt0-task%t.log"]
    assert {"--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=96"} <= set(srun)
    assert srun[-4:] == ["--config", "cfg.yaml", "rollout.n=2", f"output_dir={out_dir}"]
    assert srun[srun.index("bash") + 1].endswith("examples/launch/torchrun_multi_node.sh")
    port = 20000 + 4242 % 20000
    assert torchrun[:11] == [
        "torchrun",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "8",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"gpu07:{port}",
        "--rdzv-id",
        "gopd-4242",
    ]
    assert torchrun[-6:] == [
        "--no-python",
        "gopd-train",
        "--config",
        "cfg.yaml",
        "rollout.n=2",
        f"output_dir={out_dir}",
    ]


def test_single_node_template_command_lines(tmp_path: Path):
    srun, torchrun = _dry_run(
        SLURM / "single_node.sbatch",
        GOPD_ENTRY=SMOKE,
        GPUS_PER_NODE="2",
        OUTPUT_DIR=str(tmp_path),
        **{**_FAKE_JOB, "SLURM_NNODES": "1"},
    )
    assert f"--output={tmp_path}/logs/attempt0-task%t.log" in srun
    assert torchrun == ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "2", SMOKE]
    assert not any("output_dir=" in arg for arg in srun)  # only gopd-train gets the override
    assert not (tmp_path / "logs").exists()  # a dry run creates nothing


def test_task_per_gpu_template_command_line():
    (srun,) = _dry_run(
        SLURM / "task_per_gpu.sbatch",
        CONFIG="cfg.yaml",
        SLURM_NTASKS_PER_NODE="8(x2)",
        SLURM_RESTART_COUNT="3",
        **_FAKE_JOB,
    )
    assert {"--nodes=2", "--ntasks-per-node=8", "--cpus-per-task=12"} <= set(srun)
    assert any(arg.endswith("/logs/attempt3-task%t.log") for arg in srun)
    assert srun[-4:] == ["gopd-train", "--config", "cfg.yaml", f"output_dir={REPO}/outputs/gopd-4242"]


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_templates_checkpoint_and_requeue(template: Path):
    directives = re.findall(r"^#SBATCH (\S+)", template.read_text(), flags=re.M)
    assert "--requeue" in directives and "--open-mode=append" in directives
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives)


def _fake_slurm_commands(bin_dir: Path, preempt_time: str, step_seconds: float = 0.0) -> Path:
    """`srun` (the step: sleeps, exits 0) and `scontrol` (show job: a job that started at 12:00 with
    the given PreemptTime; requeue: recorded) stand-ins on a PATH directory; returns the record file."""
    record = bin_dir / "scontrol-calls"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/bash\nsleep {step_seconds}\nexit 0\n")
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        f'echo "$*" >>{record}\n'
        '[[ $1 == show ]] && echo "JobId=4242 JobName=gopd JobState=RUNNING StartTime=2030-01-01T12:00:00 '
        f'EndTime=2030-01-02T12:00:00 PreemptTime={preempt_time} Partition=debug"\n'
        "exit 0\n"
    )
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return record


@pytest.mark.parametrize(
    "preempt_time, requeued",
    [("2030-01-01T12:30:00", True), ("None", False), ("2030-01-01T11:00:00", False)],
    ids=["preempted", "not-preempted", "preempted-in-an-earlier-attempt"],
)
def test_template_requeues_a_preempted_job(tmp_path: Path, preempt_time: str, requeued: bool):
    """Preemption with a grace time signals only the step's processes; a step that then stops on its
    own would end the job as COMPLETED, never to resume, unless the batch shell requeues it."""
    record = _fake_slurm_commands(tmp_path / "bin", preempt_time)
    result = _bash(
        SLURM / "single_node.sbatch",
        GOPD_ENTRY=SMOKE,
        GPUS_PER_NODE="2",
        OUTPUT_DIR=str(tmp_path / "run"),
        PATH=f"{tmp_path / 'bin'}{os.pathsep}{_env()['PATH']}",
        **{**_FAKE_JOB, "SLURM_NNODES": "1", "SLURM_RESTART_COUNT": "1"},
    )
    assert result.returncode == 0, result.stderr
    calls = record.read_text().splitlines() if record.exists() else []
    assert ("requeue 4242" in calls) == requeued, calls
    assert ("after a preemption: requeueing job 4242" in result.stderr) == requeued, result.stderr


def test_template_outlives_a_sigterm_until_its_step_ends(tmp_path: Path):
    """scancel (and the end of a preemption's grace time) signals the batch shell with the step's
    processes: the shell must keep waiting while the step writes its stop checkpoint, not die first
    (its death would end the job and have Slurm kill the step)."""
    _fake_slurm_commands(tmp_path / "bin", "None", step_seconds=3)
    proc = subprocess.Popen(
        ["bash", str(SLURM / "single_node.sbatch")],
        cwd=REPO,
        env=_env(
            GOPD_ENTRY=SMOKE,
            GPUS_PER_NODE="2",
            OUTPUT_DIR=str(tmp_path / "run"),
            PATH=f"{tmp_path / 'bin'}{os.pathsep}{_env()['PATH']}",
            **{**_FAKE_JOB, "SLURM_NNODES": "1"},
        ),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(1)  # the step (the fake srun) runs
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "SIGTERM: waiting for the step" in err and "step ended with exit code 0" in err, err


def _ignored_signals(proc_status_line: str) -> set[signal.Signals]:
    """The signals in a /proc/<pid>/status `SigIgn:` mask (bit n-1 is signal n)."""
    mask = int(proc_status_line.split(":", 1)[1], 16)
    return {sig for sig in signal.Signals if sig < 64 and mask >> (sig - 1) & 1}


def _fake_torchrun(path: Path) -> Path:
    """A `torchrun` stand-in that prints what it started with: its ignored signals and the signals it
    was told to handle (PET_SIGNALS_TO_HANDLE, as torchrun >= 2.9 reads it)."""
    path.write_text(
        "#!/bin/bash\ngrep '^SigIgn:' /proc/$$/status\necho \"PET_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE\"\n"
    )
    path.chmod(0o755)
    return path


def _torchrun_start(out: str) -> tuple[set[signal.Signals], list[str]]:
    status = next(line for line in out.splitlines() if line.startswith("SigIgn:"))
    handled = next(line for line in out.splitlines() if line.startswith("PET_SIGNALS_TO_HANDLE="))
    return _ignored_signals(status), handled.split("=", 1)[1].split(",")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/<pid>/status")
def test_torchrun_outlives_sigterm_only_in_a_slurm_step(tmp_path: Path):
    """In a Slurm step every process gets scancel's or a preemption's SIGTERM, the workers included:
    torchrun must not catch it (it would exit 1 after its workers stopped cleanly, and the job would
    end FAILED), so it starts with SIGTERM ignored and not in PET_SIGNALS_TO_HANDLE. Started by hand,
    torchrun is the one that gets the signal and must forward it."""
    torchrun = _fake_torchrun(tmp_path / "torchrun")
    # The template's srun: runs the launcher as a step of job 4242 (srun sets SLURM_STEP_ID).
    _fake_slurm_commands(tmp_path / "bin", "None")
    (tmp_path / "bin" / "srun").write_text(
        '#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\nSLURM_STEP_ID=0 SLURM_NODEID=0 SLURM_PROCID=0 exec "$@"\n'
    )
    in_step = _bash(
        SLURM / "single_node.sbatch",
        GOPD_ENTRY=SMOKE,
        GPUS_PER_NODE="2",
        OUTPUT_DIR=str(tmp_path / "run"),
        TORCHRUN=str(torchrun),
        PATH=f"{tmp_path / 'bin'}{os.pathsep}{_env()['PATH']}",
        **{**_FAKE_JOB, "SLURM_NNODES": "1"},
    )
    assert in_step.returncode == 0, in_step.stderr
    ignored, handled = _torchrun_start(in_step.stdout)
    assert {signal.SIGTERM, signal.SIGUSR1} <= ignored
    assert handled == ["SIGINT", "SIGHUP", "SIGQUIT"]
    assert "torchrun ignores SIGTERM and SIGUSR1" in in_step.stderr

    by_hand = _bash(LAUNCH / "torchrun_single_node.sh", GOPD_ENTRY=SMOKE, NPROC_PER_NODE="2", TORCHRUN=str(torchrun))
    assert by_hand.returncode == 0, by_hand.stderr
    ignored, handled = _torchrun_start(by_hand.stdout)
    assert signal.SIGTERM not in ignored and signal.SIGUSR1 in ignored  # USR1: for torchrun < 2.9
    assert handled == ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1"]
    # In a Slurm job but not in a step (the batch script): torchrun is the one signalled.
    in_batch_script = _bash(
        LAUNCH / "torchrun_single_node.sh", GOPD_ENTRY=SMOKE, TORCHRUN=str(torchrun), SLURM_JOB_ID="4242"
    )
    assert signal.SIGTERM not in _torchrun_start(in_batch_script.stdout)[0]


# ----------------------------------------------------------------------------------------------
# Real runs on loopback


@pytest.fixture(scope="module")
def single_agent_result() -> str:
    """The smoke job under examples/launch/torchrun_single_node.sh on 2 workers."""
    started = _Agents()
    try:
        started.start(LAUNCH / "torchrun_single_node.sh", GOPD_ENTRY=SMOKE, NPROC_PER_NODE="2")
        return _smoke_result(started.finish())
    finally:
        started.kill()


@pytest.mark.slow
def test_single_node_launcher_runs_the_job(single_agent_result: str):
    assert float(single_agent_result) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_node_loopback_matches_single_agent(agents: _Agents, rendezvous: str, single_agent_result: str):
    """Two torchrun agents on 127.0.0.1, one worker each (a world of 2), as two nodes would run."""
    port = str(_free_port())
    where = (
        dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        if rendezvous == "static"
        else dict(RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID=f"test-{port}")
    )
    for node_rank in ("0", "1"):
        agents.start(
            LAUNCH / "torchrun_multi_node.sh",
            GOPD_ENTRY=SMOKE,
            NNODES="2",
            NODE_RANK=node_rank,
            NPROC_PER_NODE="1",
            **where,
        )
    assert _smoke_result(agents.finish()) == single_agent_result


# ----------------------------------------------------------------------------------------------
# A real Slurm (skipped unless one answers here)


def _slurm_is_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return ping.returncode == 0 and "UP" in ping.stdout


@pytest.mark.slow
@pytest.mark.skipif(not _slurm_is_up(), reason="no Slurm controller here (tools/slurm_localhost.sh starts one)")
def test_single_node_template_on_slurm(tmp_path: Path):
    out = tmp_path / "run"
    submit = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--wait",
            "--job-name=pytest-launch",
            "--gpus-per-node=0",
            "--time=10",
            f"--output={tmp_path}/slurm-%j.out",
            str(SLURM / "single_node.sbatch"),
        ],
        cwd=REPO,
        env=_env(GOPD_ENTRY=SMOKE, GPUS_PER_NODE="2", OUTPUT_DIR=str(out)),
        text=True,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
    )
    logs = "\n".join(p.read_text() for p in tmp_path.rglob("*.out")) + "\n".join(
        p.read_text() for p in (out / "logs").glob("*.log")
    )
    assert submit.returncode == 0, submit.stderr + logs
    assert SMOKE_OK.search((out / "logs" / "attempt0-task0.log").read_text()), logs
    assert (out / "attempts.log").read_text().startswith("attempt=0 job=")
