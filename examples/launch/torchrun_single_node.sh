#!/usr/bin/env bash
# Run gopd-train on one machine: one worker process per GPU, started by torchrun.
#
#   CONFIG=examples/configs/<scenario>.yaml examples/launch/torchrun_single_node.sh [key.sub=value ...]
#
# Arguments are config overrides passed on to gopd-train (e.g. `trainer.steps=10`). The job writes
# `<output_dir>/metrics.jsonl` and checkpoints under `<output_dir>/checkpoints/`; running the same
# command again resumes from the latest checkpoint.
#
# Variables (export to change; [default])
#   CONFIG          the job's YAML config (required for gopd-train)
#   NPROC_PER_NODE  worker processes [GPUS_PER_NODE, else the number of visible GPUs, else 1];
#                   the config's TP x PP (x data parallel) must fit this world size
#   GPUS_PER_NODE   same as NPROC_PER_NODE
#   CUDA_VISIBLE_DEVICES  restrict the job to some GPUs (e.g. 0,1,2,3)
#   GOPD_ENTRY      what each worker runs [gopd-train]; e.g. examples/toy/parallel_smoke.py (no CONFIG)
#   TORCHRUN_ARGS   extra torchrun options, split on spaces (e.g. "--max-restarts 1")
#   GOPD_DRY_RUN=1  print the torchrun command line instead of running it
# The NCCL / CUDA / threading environment it sets is listed, with what each knob does, at the top of
# examples/launch/common.sh. torchrun uses a private rendezvous on a free port (--standalone), so
# several single-node jobs can share a machine.
#
# CPU (development, no GPU): GOPD_FORCE_CPU=1 is implied when no GPU is visible; set NPROC_PER_NODE:
#   NPROC_PER_NODE=2 GOPD_ENTRY=examples/toy/parallel_smoke.py examples/launch/torchrun_single_node.sh
set -euo pipefail
# shellcheck source=examples/launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

nproc_per_node=${NPROC_PER_NODE:-${GPUS_PER_NODE:-$(gopd_visible_gpus)}}
[[ $nproc_per_node -ge 1 ]] 2>/dev/null || nproc_per_node=1

gopd_export_env "$nproc_per_node"
gopd_worker_argv "$@"
read -r -a extra <<<"${TORCHRUN_ARGS:-}"
gopd_torchrun_argv --standalone --nnodes 1 --nproc-per-node "$nproc_per_node" "${extra[@]}"
gopd_exec_torchrun
