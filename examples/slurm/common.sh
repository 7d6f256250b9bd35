# shellcheck shell=bash
# Sourced by the sbatch templates in this folder (not run on its own): the job's output directory and
# log files, and running the job as a Slurm step that checkpoints before the time limit and requeues
# itself.
#
# The contract with gopd-train (the job a template runs):
#   - The template passes `output_dir=<OUTPUT_DIR>` as the last config override (a GOPD_ENTRY other
#     than gopd-train gets the directory in $GOPD_OUTPUT_DIR instead). Metrics go to
#     <OUTPUT_DIR>/metrics.jsonl, checkpoints to <OUTPUT_DIR>/checkpoints/.
#   - On start, gopd-train resumes from the latest complete checkpoint in <OUTPUT_DIR>/checkpoints/
#     (and exits at once when that checkpoint is the last step).
#   - On SIGUSR1 (GOPD_CKPT_SIGNAL) or SIGTERM it saves a checkpoint after the current step and exits.
# The template's side: `#SBATCH --signal=B:USR1@<seconds>` makes Slurm signal the batch shell that
# many seconds before the time limit; the shell sends GOPD_CKPT_SIGNAL to the step (srun has Slurm
# deliver it to every process of the step: the workers, and torchrun, which survives it), waits for
# the step to end, and runs `scontrol requeue` on its own job. The requeued job keeps its job id,
# hence its OUTPUT_DIR, and resumes. Slurm starts a requeued job no sooner than about 2 minutes later
# (cred_expire). `--requeue` also lets Slurm requeue the job after a node failure or a preemption
# (PreemptMode=REQUEUE) and resumes the same way. Preemption sends SIGTERM to every process of the
# step, then SIGKILL the partition's GraceTime later (without one: to the whole job, SIGKILL KillWait
# later, as scancel does): gopd-train writes a stop checkpoint and exits 0, and so does torchrun (in a
# step it ignores SIGTERM, see examples/launch/common.sh). A job whose step stopped within a grace
# time would end as COMPLETED, not requeued, so the batch shell requeues it itself when Slurm marked
# it preempted (PreemptTime). SIGTERM to the batch shell (scancel, the end of a
# grace time) does not end the shell early: Slurm signals the step's processes as well, and the
# shell waits for their checkpoint. (Not `scancel --full --signal=TERM`: srun, in the batch step,
# turns a SIGTERM of its own into SIGKILL of the step.) A job stopped otherwise (scancel, a
# failure) resumes when resubmitted with the same OUTPUT_DIR; `scancel --signal=TERM <job>` (the
# step's processes only) ends it COMPLETED, exit code 0, after its stop checkpoint.
#
# Variables (export before sbatch, which passes your environment to the job; [default])
#   OUTPUT_DIR         where everything of this run goes [$SLURM_SUBMIT_DIR/outputs/<job name>-<job id>];
#                      give a fixed path to resume a finished or failed run from a new job
#   GOPD_OUTPUT_DIR_KEY  the config key that receives OUTPUT_DIR [output_dir]
#   GOPD_MAX_REQUEUES  stop requeueing after this many restarts of one job [20]
#   SRUN_ARGS          extra srun options, split on spaces (e.g. "--container-image=... --container-mounts=...")
#   GOPD_DRY_RUN=1     print the srun and worker command lines instead of running them (works outside
#                      Slurm: `GOPD_DRY_RUN=1 SLURM_JOB_ID=1 SLURM_NNODES=2 SLURM_JOB_NODELIST=n[1-2] bash T`)
# Log files: the batch log `slurm-<job name>-<job id>.out` in the submit directory says what ran and
# when (one block per attempt); every task of every attempt logs to
# <OUTPUT_DIR>/logs/attempt<N>-task<T>.log; <OUTPUT_DIR>/attempts.log has one line per attempt.

# shellcheck source=examples/launch/common.sh
source "$GOPD_HOME/examples/launch/common.sh"

GOPD_STEP_PID=
GOPD_CKPT_REQUESTED=0

# gopd_slurm_setup ARGS...: output directory, logs, worker arguments (GOPD_ARGV ends with
# output_dir=...) and the signal handler.
gopd_slurm_setup() {
  : "${SLURM_JOB_ID:?not inside a Slurm job (for a dry run set SLURM_JOB_ID and GOPD_DRY_RUN=1)}"
  GOPD_ATTEMPT=${SLURM_RESTART_COUNT:-0}
  OUTPUT_DIR=${OUTPUT_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/outputs/${SLURM_JOB_NAME:-gopd}-$SLURM_JOB_ID}
  [[ $OUTPUT_DIR == /* ]] || OUTPUT_DIR=${SLURM_SUBMIT_DIR:-$PWD}/$OUTPUT_DIR
  export OUTPUT_DIR GOPD_OUTPUT_DIR=$OUTPUT_DIR
  GOPD_LOG_DIR=$OUTPUT_DIR/logs
  gopd_worker_argv "$@"
  if [[ $GOPD_PROGRAM == gopd-train ]]; then
    GOPD_ARGV+=("${GOPD_OUTPUT_DIR_KEY:-output_dir}=$OUTPUT_DIR")
  fi
  # The launchers read GOPD_ENTRY/CONFIG themselves; hand them the final argument list instead.
  export GOPD_ENTRY=$GOPD_PROGRAM
  unset CONFIG
  [[ ${GOPD_DRY_RUN:-0} == 1 ]] && return
  mkdir -p "$GOPD_LOG_DIR"
  printf 'attempt=%s job=%s start=%s nodes=%s\n' "$GOPD_ATTEMPT" "$SLURM_JOB_ID" "$(date -Is)" \
    "${SLURM_JOB_NODELIST:-?}" >>"$OUTPUT_DIR/attempts.log"
  gopd_log "job $SLURM_JOB_ID attempt $GOPD_ATTEMPT on ${SLURM_JOB_NODELIST:-?}: output in $OUTPUT_DIR," \
    "task logs in $GOPD_LOG_DIR/attempt$GOPD_ATTEMPT-task*.log"
  trap '_gopd_on_time_limit' USR1
  trap '_gopd_on_term' TERM
}

# The first host of the allocation (the rendezvous host).
gopd_head_node() {
  if command -v scontrol >/dev/null 2>&1 && [[ ${GOPD_DRY_RUN:-0} != 1 ]]; then
    scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
  else  # node[01-04,07] -> node01 (enough for a dry run)
    local list=${SLURM_JOB_NODELIST:-localhost}
    list=${list%%,*}
    if [[ $list == *"["* ]]; then
      local range=${list#*[}
      echo "${list%%[*}${range%%[-,\]]*}"
    else
      echo "$list"
    fi
  fi
}

# A TCP port derived from the job id, so that jobs sharing a node do not collide.
gopd_job_port() { echo $(( 20000 + ${SLURM_JOB_ID:-0} % 20000 )); }

_gopd_on_time_limit() {
  GOPD_CKPT_REQUESTED=1
  gopd_log "time limit near (SIGUSR1): asking the job to checkpoint with SIG${GOPD_CKPT_SIGNAL:-USR1}"
  if [[ -n $GOPD_STEP_PID ]]; then
    kill -s "${GOPD_CKPT_SIGNAL:-USR1}" "$GOPD_STEP_PID" 2>/dev/null || true
  fi
}

# SIGTERM to the batch shell comes with SIGTERM to every process of the step (scancel, preemption):
# not forwarded (srun, sent a SIGTERM itself, would SIGKILL its step), only logged, so that the
# shell outlives the step's stop checkpoint.
_gopd_on_term() {
  gopd_log "SIGTERM: waiting for the step to write its stop checkpoint"
}

# _gopd_preempted: Slurm preempted this attempt of the job (PreemptTime is set, and not before the
# attempt started: a requeued job keeps its earlier PreemptTime).
_gopd_preempted() {
  local fields preempt_time start_time
  fields=$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null) || return 1
  preempt_time=$(sed -n 's/.* PreemptTime=\([^ ]*\).*/\1/p' <<<"$fields")
  start_time=$(sed -n 's/.* StartTime=\([^ ]*\).*/\1/p' <<<"$fields")
  [[ -n $preempt_time && $preempt_time != None && ! $preempt_time < $start_time ]]
}

# _gopd_requeue REASON EXIT_CODE: requeue this job (it resumes from the latest checkpoint), at most
# GOPD_MAX_REQUEUES times.
_gopd_requeue() {
  if (( GOPD_ATTEMPT >= ${GOPD_MAX_REQUEUES:-20} )); then
    gopd_die "step ended after $1, but this job already ran $((GOPD_ATTEMPT + 1)) times" \
      "(GOPD_MAX_REQUEUES): not requeueing; resubmit with OUTPUT_DIR=$OUTPUT_DIR to resume"
  fi
  gopd_log "step ended (exit code $2) after $1: requeueing job $SLURM_JOB_ID;" \
    "it resumes from the latest checkpoint in $OUTPUT_DIR/checkpoints/"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}

# gopd_slurm_step SRUN_OPTIONS... -- COMMAND...: run COMMAND as a job step with per-task logs; when
# the time-limit signal or a preemption came meanwhile, requeue the job; exit with the step's exit
# code otherwise.
gopd_slurm_step() {
  local -a srun_opts=() extra
  while [[ $1 != -- ]]; do srun_opts+=("$1"); shift; done
  shift
  read -r -a extra <<<"${SRUN_ARGS:-}"
  local -a cmd=(srun --kill-on-bad-exit=1 --output="$GOPD_LOG_DIR/attempt$GOPD_ATTEMPT-task%t.log"
                "${srun_opts[@]}" "${extra[@]}" "$@")
  if [[ ${GOPD_DRY_RUN:-0} == 1 ]]; then
    gopd_print_cmd "${cmd[@]}"
    # A torchrun launcher prints what task 0 would run (a direct command is all on the line above).
    if [[ $1 == bash && $2 == */examples/launch/*.sh ]]; then SLURM_NODEID=0 SLURM_PROCID=0 "$@"; fi
    return
  fi
  gopd_log "$(gopd_print_cmd "${cmd[@]}")"
  "${cmd[@]}" &
  GOPD_STEP_PID=$!
  local rc
  while :; do  # `wait` returns early when the trap runs; wait again until the step has ended
    rc=0
    wait "$GOPD_STEP_PID" || rc=$?
    kill -0 "$GOPD_STEP_PID" 2>/dev/null || break
  done
  GOPD_STEP_PID=
  [[ $GOPD_CKPT_REQUESTED == 1 ]] && _gopd_requeue "the time-limit signal" "$rc"
  _gopd_preempted && _gopd_requeue "a preemption" "$rc"
  gopd_log "step ended with exit code $rc"
  exit "$rc"
}
