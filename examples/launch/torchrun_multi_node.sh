#!/usr/bin/env bash
# Run gopd-train across several machines: start this script once on every node, with the same
# variables except NODE_RANK; torchrun starts one worker per GPU on each node.
#
# Fixed node ranks (a static rendezvous at MASTER_ADDR:MASTER_PORT, hosted by node rank 0):
#   node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 CONFIG=cfg.yaml examples/launch/torchrun_multi_node.sh
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 CONFIG=cfg.yaml examples/launch/torchrun_multi_node.sh
# Or a c10d rendezvous (ranks assigned as nodes join; nodes may start in any order; what the Slurm
# templates use):
#   every node$ NNODES=2 RDZV_ENDPOINT=node0:29400 RDZV_ID=run42 CONFIG=cfg.yaml examples/launch/torchrun_multi_node.sh
#
# Arguments are config overrides passed on to gopd-train (e.g. `trainer.steps=10`). Outputs and
# resume work as in torchrun_single_node.sh: the same command again resumes from the latest checkpoint
# in `<output_dir>/checkpoints/` (the output directory must be on storage every node sees).
#
# Variables (export to change; [default])
#   CONFIG          the job's YAML config (required for gopd-train)
#   NNODES          number of nodes [SLURM_NNODES, else 1]
#   NODE_RANK       this node's rank, 0..NNODES-1, for the static rendezvous [SLURM_NODEID, else 0]
#   MASTER_ADDR     address of node rank 0, reachable from every node [127.0.0.1]
#   MASTER_PORT     a free TCP port on it [29500]
#   RDZV_ENDPOINT   host:port of a c10d rendezvous; when set, NODE_RANK/MASTER_* are not used. The
#                   node whose hostname or address matches the host serves the rendezvous.
#   RDZV_ID         a name shared by the nodes of one run [gopd-SLURM_JOB_ID, else gopd-MASTER_PORT]
#   RDZV_TIMEOUT    seconds to wait for all nodes to join [900]
#   NPROC_PER_NODE  worker processes per node [GPUS_PER_NODE, else the visible GPUs, else 1]
#   GPUS_PER_NODE   same as NPROC_PER_NODE
#   GOPD_ENTRY      what each worker runs [gopd-train]; e.g. examples/toy/parallel_smoke.py (no CONFIG)
#   TORCHRUN_ARGS   extra torchrun options, split on spaces (e.g. "--max-restarts 1 --local-addr ib0-ip")
#   GOPD_DRY_RUN=1  print the torchrun command line instead of running it
# The NCCL / CUDA / threading environment it sets is listed, with what each knob does, at the top of
# examples/launch/common.sh; on a multi-node job check NCCL_SOCKET_IFNAME and NCCL_IB_HCA there.
set -euo pipefail
# shellcheck source=examples/launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

nproc_per_node=${NPROC_PER_NODE:-${GPUS_PER_NODE:-$(gopd_visible_gpus)}}
[[ $nproc_per_node -ge 1 ]] 2>/dev/null || nproc_per_node=1
nnodes=${NNODES:-${SLURM_NNODES:-1}}

gopd_export_env "$nproc_per_node"
gopd_worker_argv "$@"
read -r -a extra <<<"${TORCHRUN_ARGS:-}"
if [[ -n ${RDZV_ENDPOINT:-} ]]; then
  rendezvous=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT"
              --rdzv-id "${RDZV_ID:-gopd-${SLURM_JOB_ID:-${MASTER_PORT:-29500}}}"
              --rdzv-conf "join_timeout=${RDZV_TIMEOUT:-900}")
else
  node_rank=${NODE_RANK:-${SLURM_NODEID:-0}}
  [[ $node_rank -lt $nnodes ]] || gopd_die "NODE_RANK=$node_rank must be below NNODES=$nnodes"
  rendezvous=(--node-rank "$node_rank" --master-addr "${MASTER_ADDR:-127.0.0.1}"
              --master-port "${MASTER_PORT:-29500}")
fi
gopd_torchrun_argv --nnodes "$nnodes" --nproc-per-node "$nproc_per_node" "${rendezvous[@]}" "${extra[@]}"
gopd_exec_torchrun
