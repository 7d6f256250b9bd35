# shellcheck shell=bash
# Sourced by examples/launch/*.sh and examples/slurm/*.sbatch (not run on its own): the environment a
# Megatron job runs with, and the command line every worker runs. Every variable here is a default:
# export your own value before launching and it wins.
#
# What each worker runs
#   GOPD_ENTRY     the program [gopd-train]. A path ending in .py runs with python; anything else must
#                  be an executable on PATH (activate the venv that has megatron-gopd first).
#   CONFIG         YAML config, passed as `--config CONFIG` (required for gopd-train). Arguments given
#                  to a launcher are appended: `key.sub=value` overrides for gopd-train.
#   GOPD_DRY_RUN=1 print the resolved command line and exit without starting anything.
#   TORCHRUN       the torchrun executable [torchrun]; PYTHON the interpreter for .py entries [python3].
#
# CUDA / NCCL (no effect on a CPU run)
#   CUDA_DEVICE_MAX_CONNECTIONS=1  one hardware work queue per GPU, so kernels run in launch order:
#                  Megatron relies on it to overlap tensor/sequence-parallel communication with compute.
#   NCCL_DEBUG=WARN                INFO (with NCCL_DEBUG_SUBSYS=INIT,NET) shows which network NCCL picked.
#   NCCL_IB_TIMEOUT=22             InfiniBand retry timeout exponent (4.096 us * 2^22 = 17 s): survives
#                  brief fabric hiccups on large jobs instead of failing the collective.
#   NCCL_SOCKET_IFNAME             unset; set to the data-network interface (e.g. `ib0`, `eth0`, or
#                  `^lo,docker` to exclude some) when NCCL or Gloo bootstraps on the wrong one.
#   NCCL_IB_HCA                    unset; set to the InfiniBand adapters to use (e.g. `mlx5`) on nodes
#                  that also have storage or management adapters.
#   TORCH_NCCL_AVOID_RECORD_STREAMS=1  frees the memory of asynchronous collectives promptly
#                  (Megatron's distributed optimizer overlaps many of them).
#   PYTORCH_CUDA_ALLOC_CONF        unset; `expandable_segments:True` reduces fragmentation with
#                  variable-length rollouts, but vLLM's sleep mode (colocated rollout) rejects it.
# Host
#   OMP_NUM_THREADS                CPU cores of the node divided by its worker processes (at least 1).
#   TOKENIZERS_PARALLELISM=false   no tokenizer thread pools in forked data workers.
# Stop signals (checkpoint before a time limit, preemption, scancel; used by examples/slurm/)
#   GOPD_CKPT_SIGNAL=USR1          the signal that asks gopd-train to save a checkpoint and exit.
#   PET_SIGNALS_TO_HANDLE          signals torchrun (PyTorch >= 2.9) catches: it forwards them to its
#                  workers, waits for them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) and then exits 1 with a
#                  SignalException, however cleanly they stopped. Outside a Slurm step the default is
#                  SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1: a signal to torchrun reaches the workers.
#                  In a Slurm step (srun, SLURM_STEP_ID set) it is SIGINT,SIGHUP,SIGQUIT: Slurm
#                  delivers a step's signals (scancel, preemption, the time-limit signal the
#                  templates pass on) to every process of the step, the workers included, so
#                  torchrun need not forward SIGTERM or GOPD_CKPT_SIGNAL, and must not catch them:
#                  the launchers start it with both ignored, it outlives the workers' stop
#                  checkpoint and exits 0 when they do, and the job ends COMPLETED (`afterok`
#                  dependencies hold). The workers inherit the ignored dispositions; gopd-train
#                  installs its own handlers right after parsing its arguments, so a stop signal
#                  that comes while they still import is kept for the first step's end. A torchrun
#                  older than 2.9 ignores this variable: it survives GOPD_CKPT_SIGNAL (ignored) but
#                  catches SIGTERM itself (and exits 1).
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT=180  seconds torchrun gives workers to finish after forwarding a
#                  signal, or after one of them failed, before it kills them.

gopd_log() { printf '[gopd-launch] %s\n' "$*" >&2; }
gopd_die() { gopd_log "error: $*"; exit 1; }

# Number of GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else nvidia-smi, else 0.
gopd_visible_gpus() {
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    local -a ids
    IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# gopd_in_slurm_step: this process runs in a Slurm job step (started by srun; the batch script
# itself is not one), where Slurm signals every process of the step.
gopd_in_slurm_step() { [[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_STEP_ID:-} ]]; }

# gopd_export_env PROCS_PER_NODE: export the defaults documented above.
gopd_export_env() {
  local procs=$1 cores
  cores=$(nproc 2>/dev/null || echo 1)
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
  export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
  export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / procs > 0 ? cores / procs : 1 ))}
  export GOPD_CKPT_SIGNAL=${GOPD_CKPT_SIGNAL:-USR1}
  if gopd_in_slurm_step; then
    export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGINT,SIGHUP,SIGQUIT}
  else
    export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIG${GOPD_CKPT_SIGNAL#SIG}}
  fi
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-180}
}

# gopd_worker_argv ARGS...: sets GOPD_PROGRAM (the entry) and GOPD_ARGV (its arguments).
gopd_worker_argv() {
  GOPD_PROGRAM=${GOPD_ENTRY:-gopd-train}
  GOPD_ARGV=()
  if [[ -n ${CONFIG:-} ]]; then
    GOPD_ARGV+=(--config "$CONFIG")
  elif [[ $GOPD_PROGRAM == gopd-train && " $* " != *" --config "* ]]; then
    gopd_die "set CONFIG to the job's YAML config, e.g. CONFIG=examples/configs/<scenario>.yaml"
  fi
  GOPD_ARGV+=("$@")
}

# gopd_torchrun_argv TORCHRUN_OPTIONS...: the full torchrun command for GOPD_PROGRAM/GOPD_ARGV,
# in GOPD_CMD. A .py entry is run by torchrun's python; any other entry with --no-python.
gopd_torchrun_argv() {
  GOPD_CMD=("${TORCHRUN:-torchrun}" "$@")
  if [[ $GOPD_PROGRAM == *.py ]]; then
    GOPD_CMD+=("$GOPD_PROGRAM")
  else
    GOPD_CMD+=(--no-python "$GOPD_PROGRAM")
  fi
  GOPD_CMD+=("${GOPD_ARGV[@]}")
}

# gopd_direct_argv: the command for GOPD_PROGRAM/GOPD_ARGV without torchrun (one process per GPU
# started by srun), in GOPD_CMD.
gopd_direct_argv() {
  if [[ $GOPD_PROGRAM == *.py ]]; then
    GOPD_CMD=("${PYTHON:-python3}" "$GOPD_PROGRAM" "${GOPD_ARGV[@]}")
  else
    GOPD_CMD=("$GOPD_PROGRAM" "${GOPD_ARGV[@]}")
  fi
}

# gopd_exec_torchrun: run GOPD_CMD (a torchrun command) in place of this shell, with GOPD_CKPT_SIGNAL
# ignored, and SIGTERM too in a Slurm step (see PET_SIGNALS_TO_HANDLE above); a signal in
# PET_SIGNALS_TO_HANDLE gets torchrun's own handler instead.
gopd_exec_torchrun() {
  if [[ ${GOPD_DRY_RUN:-0} != 1 ]]; then
    trap '' "$GOPD_CKPT_SIGNAL"
    if gopd_in_slurm_step; then
      trap '' TERM
      gopd_log "in Slurm step $SLURM_JOB_ID.$SLURM_STEP_ID: torchrun ignores SIGTERM and" \
        "SIG${GOPD_CKPT_SIGNAL#SIG} (Slurm signals the workers directly) and handles $PET_SIGNALS_TO_HANDLE"
    fi
  fi
  gopd_exec "${GOPD_CMD[@]}"
}

# gopd_print_cmd CMD...: the command, shell-quoted, on one line of stdout.
gopd_print_cmd() {
  local out
  printf -v out '%q ' "$@"
  printf '%s\n' "${out% }"
}

# gopd_exec CMD...: replace this shell with CMD (so signals reach torchrun directly), or print it
# under GOPD_DRY_RUN=1.
gopd_exec() {
  if [[ ${GOPD_DRY_RUN:-0} == 1 ]]; then
    gopd_print_cmd "$@"
    exit 0
  fi
  gopd_log "$(gopd_print_cmd "$@")"
  exec "$@"
}
