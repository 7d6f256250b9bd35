"""Console entry points: ``gopd-convert`` (more join as their features land).

Each command parses and checks its arguments, starts the distributed job (re-launching itself under
its ranks as local processes when it needs more than it was started with), and calls the library.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import Callable, Optional, Sequence

logger = logging.getLogger("megatron_gopd.cli")

_RELAUNCHED_ENV = "GOPD_RELAUNCHED"
_TRAIN_PLAN_ENV = "GOPD_TRAIN_PLAN"
"""What the launcher checked (`TrainPlan` JSON), handed to the ranks it starts."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _trains_here(ranks: int) -> bool:
    """Whether this process will be a training rank itself (not the launcher of `ranks` local ones)."""
    launched = "WORLD_SIZE" in os.environ or "SLURM_NTASKS" in os.environ
    return ranks <= 1 or launched or bool(os.environ.get(_RELAUNCHED_ENV))


def ensure_world_size(
    ranks: int,
    command: str,
    argv: Sequence[str],
    script: Optional[str] = None,
    env: Optional[dict[str, str]] = None,
    pass_fds: Sequence[int] = (),
) -> Optional[int]:
    """Re-run this command as `ranks` local processes when started without a launcher.

    `command` names a console command of this module; a tool passes its own `script` path instead.
    `env` adds variables for the ranks; `pass_fds` stay open in them. Returns the job's exit code
    when it launched, None when the current process should go on (already inside a distributed
    launch, or one rank is enough). Signals to this process reach the ranks
    (`megatron_gopd.process.launch_local_ranks`).
    """
    from megatron_gopd.process import launch_local_ranks

    if _trains_here(ranks):
        return None
    argv = [*([script] if script else ["-m", "megatron_gopd.cli", command]), *argv]
    return launch_local_ranks(
        ranks,
        argv,
        env={**os.environ, **(env or {}), _RELAUNCHED_ENV: "1"},
        master_port=_free_port(),
        pass_fds=pass_fds,
    )


def _run_distributed(job: Callable[[], None], cleanup: Optional[Callable[[], object]] = None) -> int:
    """Start torch.distributed, run `job`, tear down; a ValueError / FileNotFoundError is exit 2."""
    from megatron_gopd import platform

    platform.init_distributed()
    try:
        job()
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
    finally:
        if cleanup is not None:
            cleanup()
        platform.shutdown_distributed()
    return 0


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """`argv` minus ``--nproc N`` / ``--nproc=N``: the re-launched ranks are launched already."""
    return [a for i, a in enumerate(argv) if not a.startswith("--nproc") and not (i and argv[i - 1] == "--nproc")]


# ----------------------------------------------------------------------------------------------
# gopd-convert


def _convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gopd-convert",
        description="Convert checkpoints between Hugging Face and Megatron (torch_dist) formats. "
        "Runs on CPU (gloo) or GPU; started without torchrun it launches tp*pp*ep local "
        "ranks itself.",
    )
    sub = parser.add_subparsers(dest="direction", required=True)
    to_mcore = sub.add_parser(
        "hf-to-mcore",
        help="HF directory -> Megatron distributed checkpoint",
        description="Read a HF model directory (config.json + safetensors) and "
        "write a Megatron torch_dist checkpoint that any TP/PP/EP "
        "layout can load, plus the HF config and tokenizer files.",
    )
    to_mcore.add_argument("--hf-dir", required=True, help="HF model directory (config.json, *.safetensors)")
    to_mcore.add_argument("--out", required=True, help="new (or empty) checkpoint directory")
    to_hf = sub.add_parser(
        "mcore-to-hf",
        help="Megatron checkpoint -> HF directory",
        description="Write sharded safetensors, model.safetensors.index.json, "
        "config.json and tokenizer files loadable by transformers.",
    )
    to_hf.add_argument("--ckpt", required=True, help="checkpoint written by hf-to-mcore or gopd-train")
    to_hf.add_argument("--out", required=True, help="new (or empty) HF output directory")
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (GB)")
    for p in (to_mcore, to_hf):
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the job")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the job")
        p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
        p.add_argument("--log-level", default="INFO")
    to_mcore.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="parameter dtype of the checkpoint (default: the HF checkpoint's)",
    )
    return parser


def convert_main(argv: Optional[Sequence[str]] = None) -> int:
    """``gopd-convert {hf-to-mcore,mcore-to-hf} ...``; see ``gopd-convert --help``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _convert_parser().parse_args(argv)
    from megatron_gopd.log import setup_logging

    setup_logging(args.log_level)
    from megatron_gopd.bridge.convert import check_conversion, hf_to_mcore, mcore_to_hf
    from megatron_gopd.models import ParallelLayout

    layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep)
    if not os.environ.get(_RELAUNCHED_ENV):  # checked once, before any rank starts
        try:
            check_conversion(
                args.direction, args.hf_dir if args.direction == "hf-to-mcore" else args.ckpt, args.out, layout
            )
        except (ValueError, FileNotFoundError) as err:
            logger.error("%s", err)
            return 2
    relaunched = ensure_world_size(args.tp * args.pp * args.ep, "gopd-convert", argv)
    if relaunched is not None:
        return relaunched

    def convert() -> None:
        if args.direction == "hf-to-mcore":
            hf_to_mcore(args.hf_dir, args.out, layout, dtype=args.dtype)
        else:
            mcore_to_hf(args.ckpt, args.out, layout, max_shard_bytes=int(args.max_shard_gb * 1024**3))

    return _run_distributed(convert)


# ----------------------------------------------------------------------------------------------
# gopd-train


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gopd-train",
        description="Train a student by generalized on-policy distillation. Writes "
        "<output_dir>/metrics.jsonl (one JSON object per step), TensorBoard events, "
        "checkpoints under <output_dir>/checkpoints/ (a restarted run resumes from the "
        "latest automatically) and the final student as a HF directory <output_dir>/hf.",
        epilog="Launch with torchrun (or srun) for several ranks, or pass --nproc N to start N local "
        "ranks. Example: gopd-train --config examples/configs/tiny_multi_teacher.yaml "
        "steps=2 optim.lr=1e-4",
    )
    parser.add_argument("--config", required=True, help="YAML file with the job's TrainConfig")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="dotted overrides of config fields, e.g. optim.lr=1e-5 rollout.n=4",
    )
    parser.add_argument(
        "--nproc", type=int, default=1, help="start this many local ranks when not already launched (torchrun / srun)"
    )
    parser.add_argument("--log-level", default="INFO")
    plan = parser.add_argument_group(
        "memory plan",
        "--plan prints the per-rank memory of every phase (static state, rollout KV "
        "cache, scoring, training) and exits: 0 when the job fits, 2 when it does not (with what to "
        "change). No rank starts and no model is built.",
    )
    plan.add_argument("--plan", action="store_true", help="print the memory plan and exit")
    plan.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="GPUs of the planned job (default: --nproc, or WORLD_SIZE / SLURM_NTASKS)",
    )
    plan.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default=None,
        help="plan GPU ranks or CPU ranks (default: cuda where this machine has a GPU, else cpu)",
    )
    plan.add_argument(
        "--device-memory-gb",
        type=float,
        default=None,
        help="memory of one rank's device: a GPU's (default: this machine's GPU, else 80), or for "
        "--device cpu each rank's share of the host (default: this machine's RAM / world size)",
    )
    plan.add_argument(
        "--model-shapes",
        default=None,
        metavar="DIR",
        help="read <checkpoint name>.json HF configs from DIR for checkpoints that are not "
        "on this machine (e.g. examples/configs/model_shapes)",
    )
    plan.add_argument(
        "--attention",
        choices=["sdpa", "local"],
        default=None,
        help="plan for this attention kind (default: what this machine's layer spec uses)",
    )
    return parser


def _print_memory_plan(args: argparse.Namespace, cfg, world_size: int) -> int:
    """``gopd-train --plan``: print the plan; 0 if it fits, 2 if not."""
    import psutil
    import torch

    from megatron_gopd import platform
    from megatron_gopd.trainer.memory import plan_train_memory

    ranks = args.world_size or world_size
    device = args.device or ("cpu" if platform.cpu_mode() else "cuda")
    device_gb = args.device_memory_gb
    if device_gb is None and device == "cpu":  # local CPU ranks share this machine's memory
        device_gb = psutil.virtual_memory().total / 1e9 / ranks
    elif device_gb is None:
        device_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else 80.0
    plan = plan_train_memory(cfg, ranks, device_gb, args.model_shapes, args.attention, device=device)
    where = f"{ranks} CPU rank{'s' if ranks > 1 else ''}" if device == "cpu" else f"{ranks} GPUs"
    print(f"{args.config} on {where}")
    print(plan.table())
    if plan.fits:
        return 0
    for line in plan.advice():
        print(f"DOES NOT FIT: {line}")
    return 2


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """``gopd-train --config FILE [key.sub=value ...]``; see ``gopd-train --help``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _train_parser().parse_args(argv)
    if _trains_here(args.nproc):
        # Before the heavy imports: a stop signal from now on is a request the trainer honours
        # at its first step boundary, never lost and never fatal mid-start.
        from megatron_gopd.process import latch_stop_signals

        latch_stop_signals()
    from megatron_gopd.log import setup_logging

    setup_logging(args.log_level)
    from megatron_gopd.config import load_config
    from megatron_gopd.trainer import TrainConfig, TrainPlan, check_train_config

    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", args.nproc)))
    try:  # a bad config fails here, before any rank starts or any model is built
        cfg = load_config(TrainConfig, args.config, args.overrides)
        if args.plan:
            return _print_memory_plan(args, cfg, world_size)
        # Checked once: ranks this process launches reuse its plan instead of reading every
        # checkpoint and prompt file again.
        handed_down = os.environ.get(_TRAIN_PLAN_ENV)
        plan = TrainPlan.from_json(handed_down) if handed_down else check_train_config(cfg, world_size)
        lock = _lock_output_dir(cfg.output_dir)
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
        logger.error("%s", err)
        return 2
    relaunched = ensure_world_size(
        args.nproc,
        "gopd-train",
        _without_nproc(argv),
        env={_TRAIN_PLAN_ENV: plan.to_json()},
        pass_fds=[lock.fileno()] if lock is not None else [],
    )
    if relaunched is not None:
        return relaunched

    from megatron_gopd.trainer import Trainer

    trainers: list = []

    def train() -> None:
        trainers.append(Trainer(cfg, plan))
        trainers[0].run()

    try:
        return _run_distributed(train, cleanup=lambda: [t.close() for t in trainers])
    finally:
        if lock is not None:
            lock.release()


def _lock_output_dir(output_dir: str):
    """The output directory's lock, taken by the job's launcher (or its rank 0 under an external
    launcher); None in the ranks a launcher started, whose launcher holds it."""
    from megatron_gopd.process import OutputDirLock

    if os.environ.get(_RELAUNCHED_ENV):
        return None
    global_rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    return OutputDirLock(output_dir).acquire() if global_rank == 0 else None


# ----------------------------------------------------------------------------------------------
# gopd-eval


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gopd-eval",
        description="avg@k (and pass@k) of a model on a prompt file, per domain, with the dataset's "
        "verifiers (math answers, sandboxed code tests). Prints a table and writes JSON.",
        epilog="Example: gopd-eval --model outputs/run/hf --data data/math_test.jsonl --k 8 "
        "--temperature 1.0 --max-new-tokens 4096 --out results.json",
    )
    parser.add_argument(
        "--model", required=True, help="a HF model directory or a Megatron checkpoint (gopd-convert / gopd-train)"
    )
    parser.add_argument("--data", required=True, help="prompt file (.jsonl, .parquet or a saved dataset)")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--max-prompt-length", type=int, default=None, help="drop (and count) longer prompts")
    parser.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first N prompts")
    parser.add_argument(
        "--enable-thinking", choices=["true", "false"], default=None, help="passed to the chat template (Qwen3)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument(
        "--nproc", type=int, default=1, help="start this many local ranks when not already launched (torchrun / srun)"
    )
    parser.add_argument(
        "--engine",
        choices=["auto", "fast", "megatron", "vllm"],
        default="auto",
        help="rollout engine: fast (continuous batching over KV slots; dense models without "
        "pipeline parallelism), megatron (any layout), auto (fast where it applies), vllm "
        "(one vLLM engine per data-parallel replica, TP = --tp, pp must be 1; needs vLLM)",
    )
    parser.add_argument(
        "--kv-cache-gb",
        type=float,
        default=None,
        help="fast / vllm engine: KV-cache budget per GPU in GB (default: fast 90%% of free GPU "
        "memory, vLLM half the GPU; 1 GB on CPU)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="megatron engine: most samples decoded at once (vLLM: max_num_seqs)",
    )
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    parser.add_argument(
        "--samples-out",
        default=None,
        help="also write every sample (prompt fields + response, verdict) as JSON lines; "
        "the file trains `gopd-train mode=sft` on these responses",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    """``gopd-eval --model PATH --data FILE [--k N ...]``; see ``gopd-eval --help``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _eval_parser().parse_args(argv)
    from megatron_gopd.log import setup_logging

    setup_logging(args.log_level)
    if args.k < 1:
        logger.error("--k must be >= 1, got %d", args.k)
        return 2
    for path, what in ((args.model, "--model"), (args.data, "--data")):
        if not os.path.exists(path):
            logger.error("%s %s does not exist", what, path)
            return 2
    if args.engine == "vllm":  # before any rank starts: vLLM installed, and able to serve this model here
        from megatron_gopd.evaluation.eval_job import model_config_dir
        from megatron_gopd.models import ModelArchitecture
        from megatron_gopd.rollout.vllm_engine import check_vllm_support

        try:
            check_vllm_support(
                ModelArchitecture.from_pretrained(model_config_dir(args.model)),
                tp=args.tp,
                pp=args.pp,
                where="--engine vllm",
            )
        except (ValueError, FileNotFoundError) as err:
            logger.error("%s", err)
            return 2
    relaunched = ensure_world_size(args.nproc, "gopd-eval", _without_nproc(argv))
    if relaunched is not None:
        return relaunched

    from megatron_gopd.evaluation.eval_job import run_eval

    return _run_distributed(lambda: run_eval(args))


_COMMANDS = {"gopd-convert": convert_main, "gopd-train": train_main, "gopd-eval": eval_main}


def main() -> int:
    """``python -m megatron_gopd.cli COMMAND ...`` (how a launcher starts its ranks)."""
    if len(sys.argv) < 2 or sys.argv[1] not in _COMMANDS:
        print(f"usage: python -m megatron_gopd.cli {{{','.join(_COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return _COMMANDS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
