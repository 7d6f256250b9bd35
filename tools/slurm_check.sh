#!/usr/bin/env bash
# End-to-end check of the sbatch templates in examples/slurm/ on a real Slurm on this machine.
#
#   tools/slurm_check.sh                 # installs and starts Slurm if needed (root, apt), then checks
#   tools/slurm_check.sh --time-limit    # also a real time limit (adds about 3 minutes)
#   tools/slurm_check.sh requeue-admin   # only the checks named (see the list below)
#
# Each check submits a template with sbatch, waits for the job and checks its state and outputs;
# the script exits non-zero on the first failure and prints the job's logs. The quick checks run
# examples/toy/parallel_smoke.py (2 ranks) or tools/slurm_check_job.py, a stand-in that keeps
# gopd-train's checkpoint/resume contract (see examples/slurm/common.sh); the *-group checks run the
# real gopd-train (tiny config, 2 workers under torchrun; makes the tiny assets first if missing):
#   smoke-single   single_node.sbatch: one torchrun agent, 2 workers; the smoke job prints OK
#   smoke-multi    multi_node.sbatch on 1 node: c10d rendezvous on the first node of the allocation
#   smoke-tasks    task_per_gpu.sbatch: 2 srun tasks, ranks from SLURM_PROCID (platform.py)
#   requeue-signal the time-limit path: `scancel --batch --signal=USR1` (what --signal=B:USR1@300
#                  sends before the limit) -> checkpoint, the job requeues itself, resumes, completes
#   requeue-old-torchrun  the same with a torchrun that does not handle SIGUSR1 (PyTorch < 2.9): it
#                  ignores the signal, the workers get it from Slurm directly
#   requeue-admin  `scontrol requeue` of a running job -> it runs again in the same output directory
#                  and resumes from the first run's checkpoint
#   preempt-group  a real preemption: a job in the higher-priority partition `urgent` needs the node,
#                  Slurm sends SIGTERM to every process of our step (torchrun, workers, checkpoint
#                  writers; the partition's GraceTime before SIGKILL); gopd-train writes a complete
#                  stop checkpoint and exits, the job requeues itself, resumes from that checkpoint
#                  and ends with every step in metrics.jsonl exactly once
#   cancel-group   `scancel` (SIGTERM to every process of the job, the batch shell included; SIGKILL
#                  KillWait later): a complete stop checkpoint; resubmitted with the same OUTPUT_DIR,
#                  the job resumes from it and ends with every step exactly once
#   term-clean     `scancel --signal=TERM` (SIGTERM to every process of the job's steps, no SIGKILL):
#                  gopd-train writes a complete stop checkpoint, torchrun (which ignores SIGTERM in a
#                  step) exits 0 after its workers, and the job ends COMPLETED with exit code 0:0, so
#                  `afterok` dependencies hold; resubmitted, it resumes and ends with every step once
#   time-limit     (--time-limit) a 3-minute limit with --signal=B:USR1@90 and a job that needs longer:
#                  Slurm's own warning signal triggers checkpoint, requeue and resume
#   gopd-tiny      (only when named) the real gopd-train on examples/configs/tiny_multi_teacher.yaml,
#                  4 workers: signalled after its second checkpoint, requeued, resumed; metrics.jsonl
#                  must then hold every step exactly once (makes the tiny assets first if missing)
# Outputs stay in $SLURM_CHECK_DIR [a new /tmp/gopd-slurm-check.XXXX] for inspection.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
[[ -x .venv/bin/python ]] && export PATH=$REPO/.venv/bin:$PATH
WORK=${SLURM_CHECK_DIR:-$(mktemp -d /tmp/gopd-slurm-check.XXXX)}
mkdir -p "$WORK"
CHECKS=(smoke-single smoke-multi smoke-tasks requeue-signal requeue-old-torchrun requeue-admin
        preempt-group cancel-group term-clean)
if [[ ${1:-} == --time-limit ]]; then CHECKS+=(time-limit); shift; fi
[[ $# -gt 0 ]] && CHECKS=("$@")

say() { printf '[slurm-check] %s\n' "$*"; }
JOB=  # the job under check, for the failure report

fail() {  # to stderr, so that a failure inside $(...) is seen too
  {
    say "FAIL: $*"
    if [[ -n $JOB ]]; then
      scontrol show job "$JOB" 2>/dev/null || true
      for f in "$WORK"/*"$JOB"*.out "$WORK"/*/logs/*.log; do
        [[ -f $f ]] && { echo "----- $f"; tail -n 40 "$f"; }
      done
    fi
  } >&2
  exit 1
}

job_field() { scontrol show job "$1" -o 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p"; }

# submit NAME TEMPLATE [sbatch options...] -- [job arguments...]: prints the job id.
submit() {
  local name=$1 template=$2; shift 2
  local -a opts=()
  while [[ $# -gt 0 && $1 != -- ]]; do opts+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift
  # No GPUs here; a short limit whose 300 s warning signal does not fire during the checks.
  sbatch --parsable --job-name="check-$name" --gpus-per-node=0 --time=10 \
    --output="$WORK/slurm-%x-%j.out" "${opts[@]}" "$template" "$@"
}

wait_state() {  # wait_state JOB TIMEOUT_S: waits for a final state and prints it
  local state deadline=$((SECONDS + $2))
  while (( SECONDS < deadline )); do
    state=$(job_field "$1" JobState)
    case $state in
      COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED)
        echo "$state"; return ;;
    esac
    sleep 1
  done
  echo "STILL-${state:-UNKNOWN}"
}

wait_for_lines() {  # wait_for_lines PATH LINES TIMEOUT_S: until PATH has at least LINES lines
  local deadline=$((SECONDS + $3))
  while (( SECONDS < deadline )); do
    [[ -f $1 && $(wc -l <"$1") -ge $2 ]] && return 0
    sleep 0.2
  done
  return 1
}

wait_for_file() {  # wait_for_file PATH TIMEOUT_S
  local deadline=$((SECONDS + $2))
  while (( SECONDS < deadline )); do [[ -e $1 ]] && return 0; sleep 0.5; done
  return 1
}

expect_completed() {  # expect_completed JOB RESTARTS TIMEOUT_S (RESTARTS "1+": at least one)
  local state restarts
  state=$(wait_state "$1" "$3")
  [[ $state == COMPLETED ]] || fail "job $1 ended $state, expected COMPLETED"
  restarts=$(job_field "$1" Restarts)
  if [[ $2 == *+ ]]; then
    (( restarts >= ${2%+} )) || fail "job $1 ran $((restarts + 1)) times, expected at least $((${2%+} + 1))"
  else
    [[ $restarts == "$2" ]] || fail "job $1 ran $((restarts + 1)) times, expected $(($2 + 1))"
  fi
}

expect_in() {  # expect_in FILE TEXT
  [[ -f $1 ]] || fail "$1 is missing"
  grep -qF -- "$2" "$1" || fail "'$2' not found in $1"
}

check_smoke() {  # check_smoke NAME TEMPLATE [sbatch options...]
  local name=$1 template=$2 start=$SECONDS; shift 2
  local out=$WORK/$name
  JOB=$(OUTPUT_DIR=$out GOPD_ENTRY=examples/toy/parallel_smoke.py GPUS_PER_NODE=2 \
        submit "$name" "$template" "$@")
  say "$name: job $JOB ($template)"
  expect_completed "$JOB" 0 300
  expect_in "$out/logs/attempt0-task0.log" "parallel smoke test: OK"
  [[ $(wc -l <"$out/attempts.log") -eq 1 ]] || fail "$out/attempts.log should have one line"
  expect_in "$WORK/slurm-check-$name-$JOB.out" "step ended with exit code 0"
  say "$name: PASS in $((SECONDS - start)) s"
}

check_resumed() {  # check_resumed OUT STEPS: every later attempt resumed; the last one finished
  local out=$1 last
  last=$(job_field "$JOB" Restarts)
  for (( n = 1; n <= last; n++ )); do
    expect_in "$out/logs/attempt$n-task0.log" "attempt $n: resumed from checkpoint step-"
  done
  expect_in "$out/logs/attempt$last-task0.log" "attempt $last: finished $2 steps"
  [[ $(wc -l <"$out/attempts.log") -eq $((last + 1)) ]] || fail "$out/attempts.log should have $((last + 1)) lines"
  [[ $(tail -n 1 "$out/metrics.jsonl") == "{\"step\": $2, \"attempt\": $last}" ]] \
    || fail "the last metrics line of $out/metrics.jsonl is not step $2 of attempt $last"
}

check_requeue_signal() {  # check_requeue_signal NAME [VAR=value...]: the job's extra environment
  local name=$1 start=$SECONDS out=$WORK/$1; shift
  JOB=$( for assignment in "$@"; do export "${assignment?}"; done
        OUTPUT_DIR=$out GOPD_ENTRY=tools/slurm_check_job.py GPUS_PER_NODE=2 \
          submit "$name" examples/slurm/single_node.sbatch -- --steps 80 --step-seconds 0.25)
  say "$name: job $JOB; signalling it as the time limit would once it has a checkpoint"
  wait_for_file "$out/checkpoints/step-000005" 120 || fail "no first checkpoint"
  scancel --batch --signal=USR1 "$JOB"
  expect_completed "$JOB" 1 300
  expect_in "$out/logs/attempt0-task0.log" "attempt 0: SIGUSR1 received: checkpoint step-"
  expect_in "$WORK/slurm-check-$name-$JOB.out" "requeueing job $JOB"
  check_resumed "$out" 80
  say "$name: PASS in $((SECONDS - start)) s ($(grep -o 'resumed from checkpoint step-[0-9]*' \
    "$out/logs/attempt1-task0.log"))"
}

check_requeue_admin() {
  local name=requeue-admin start=$SECONDS out=$WORK/requeue-admin
  JOB=$(OUTPUT_DIR=$out GOPD_ENTRY=tools/slurm_check_job.py GPUS_PER_NODE=2 \
        submit "$name" examples/slurm/single_node.sbatch -- --steps 80 --step-seconds 0.25)
  say "$name: job $JOB; scontrol requeue once it has a checkpoint"
  wait_for_file "$out/checkpoints/step-000005" 120 || fail "no first checkpoint"
  scontrol requeue "$JOB"
  expect_completed "$JOB" 1 300
  check_resumed "$out" 80
  say "$name: PASS in $((SECONDS - start)) s ($(grep -o 'resumed from checkpoint step-[0-9]*' \
    "$out/logs/attempt1-task0.log"))"
}

check_time_limit() {
  local name=time-limit start=$SECONDS out=$WORK/time-limit
  # A 3-minute limit, warned 90 s before it (Slurm may warn up to 60 s earlier still); the job wants
  # 130 s of steps, so it needs at least one checkpoint-requeue-resume cycle to finish.
  JOB=$(OUTPUT_DIR=$out GOPD_ENTRY=tools/slurm_check_job.py GPUS_PER_NODE=2 \
        submit "$name" examples/slurm/single_node.sbatch --time=3 --signal=B:USR1@90 -- \
        --steps 130 --step-seconds 1)
  say "$name: job $JOB with a 3-minute limit, warned 90 s before it"
  expect_completed "$JOB" 1+ 900
  expect_in "$WORK/slurm-check-$name-$JOB.out" "time limit near"
  check_resumed "$out" 130
  say "$name: PASS in $((SECONDS - start)) s ($(job_field "$JOB" Restarts) requeues)"
}

need_gopd_train() {  # gopd-train and the tiny assets its tiny config reads
  command -v gopd-train >/dev/null || fail "gopd-train is not installed (pip install -e .)"
  [[ -d outputs/tiny_assets ]] || python examples/toy/make_tiny_assets.py
}

expect_steps_once() {  # expect_steps_once OUT STEPS: OUT/metrics.jsonl holds steps 1..STEPS once each
  local got
  got=$(python -c "import json, sys; print(' '.join(str(json.loads(l)['step']) for l in open(sys.argv[1])))" \
        "$1/metrics.jsonl")
  [[ $got == "$(seq -s ' ' 1 "$2")" ]] || fail "$1/metrics.jsonl steps are '$got', expected 1..$2 once each"
}

wait_not_running() {  # wait_not_running JOB TIMEOUT_S: until this attempt of JOB has ended
  local deadline=$((SECONDS + $2))
  while (( SECONDS < deadline )); do
    [[ $(job_field "$1" JobState) == RUNNING ]] || return 0
    sleep 0.5
  done
  return 1
}

submit_tiny_train() {  # submit_tiny_train NAME OUT STEPS [sbatch options...]: prints the job id
  local name=$1 out=$2 steps=$3; shift 3
  # The real gopd-train under torchrun, 2 workers (the tiny config's math teacher on one stage).
  OUTPUT_DIR=$out CONFIG=examples/configs/tiny_multi_teacher.yaml GPUS_PER_NODE=2 \
    submit "$name" examples/slurm/single_node.sbatch --time=30 "$@" -- "steps=$steps" save_every=5 \
    export_hf=false scoring.teachers.math.model.pp=1
}

start_tiny_train() {  # start_tiny_train NAME OUT STEPS WHAT: JOB runs gopd-train and has done a step
  need_gopd_train
  JOB=$(submit_tiny_train "$1" "$2" "$3")
  say "$1: job $JOB (gopd-train, 2 workers); $4 after its first step"
  # Early, so that the signal lands mid-run however fast the steps go (0.2-4 s here).
  wait_for_lines "$2/metrics.jsonl" 1 900 || fail "no first step"
}

stop_checkpoint_step() {  # stop_checkpoint_step TASK_LOG OUT: the step of the stop checkpoint, checked
  local step
  step=$(grep -o 'stop signal received: checkpointed step [0-9]*' "$1" | head -n 1 | grep -o '[0-9]*$') \
    || fail "gopd-train wrote no stop checkpoint (nothing in $1; did it finish before the signal?)"
  # Checked before the next start tidies up: the checkpoint is complete and nothing is half-written.
  [[ -f $2/checkpoints/$(printf 'step_%06d' "$step")/trainer_state.json ]] \
    || fail "the stop checkpoint of step $step is incomplete"
  [[ -z $(find "$2/checkpoints" -maxdepth 1 -name '*.tmp-*') ]] || fail "temporary checkpoint directories left"
  echo "$step"
}

expect_resumed_from() {  # expect_resumed_from TASK_LOG STEP
  expect_in "$1" "$(printf 'resumed from %s (step %d)' "${1%/logs/*}/checkpoints/$(printf 'step_%06d' "$2")" "$2")"
}

wait_gone() {  # wait_gone JOB TIMEOUT_S: until no process of JOB is left (a cancelled job is COMPLETING first)
  local deadline=$((SECONDS + $2))
  while (( SECONDS < deadline )); do
    [[ -z $(squeue --noheader --jobs="$1" --format=%t 2>/dev/null) ]] && return 0
    sleep 0.5
  done
  return 1
}

resubmit_resumes() {  # resubmit_resumes NAME OUT STEPS STOPPED_AT: a new job on OUT resumes from STOPPED_AT
  mv "$2/logs/attempt0-task0.log" "$2/logs/stopped-job-$JOB-task0.log"  # the new job's attempt 0 logs there
  JOB=$(submit_tiny_train "$1" "$2" "$3")
  say "$1: resubmitted as job $JOB with the same OUTPUT_DIR"
  expect_completed "$JOB" 0 1800
  expect_resumed_from "$2/logs/attempt0-task0.log" "$4"
  expect_steps_once "$2" "$3"
}

check_preempt_group() {
  local name=preempt-group start=$SECONDS out=$WORK/preempt-group steps=12 urgent stopped_at
  start_tiny_train "$name" "$out" "$steps" "preempting it"
  # A job in the higher-priority partition that needs the whole node: Slurm preempts ours, which
  # gets SIGTERM on every process of its step (torchrun, the workers, their checkpoint writers).
  urgent=$(sbatch --parsable --partition=urgent --exclusive --job-name=check-urgent --time=2 \
           --output="$WORK/slurm-%x-%j.out" --wrap 'echo urgent job ran')
  wait_not_running "$JOB" 300 || fail "job $JOB still runs 300 s after the preemption"
  stopped_at=$(stop_checkpoint_step "$out/logs/attempt0-task0.log" "$out")
  # torchrun ignores SIGTERM in a step, so the step ends with its workers' exit code.
  expect_in "$WORK/slurm-check-$name-$JOB.out" "step ended (exit code 0) after a preemption: requeueing job $JOB"
  [[ $(wait_state "$urgent" 300) == COMPLETED ]] || fail "the preempting job $urgent did not complete"
  expect_completed "$JOB" 1 1800
  expect_resumed_from "$out/logs/attempt1-task0.log" "$stopped_at"
  expect_steps_once "$out" "$steps"
  say "$name: PASS in $((SECONDS - start)) s (stop checkpoint at step $stopped_at, requeued, resumed from it)"
}

check_cancel_group() {
  local name=cancel-group start=$SECONDS out=$WORK/cancel-group steps=12 stopped_at state
  start_tiny_train "$name" "$out" "$steps" "scancel (then a resubmission)"
  # SIGTERM to every process of the job, the batch shell included; SIGKILL KillWait (30 s) later.
  scancel "$JOB"
  state=$(wait_state "$JOB" 300)
  [[ $state == CANCELLED ]] || fail "job $JOB ended $state, expected CANCELLED"
  wait_gone "$JOB" 120 || fail "job $JOB's processes still run 120 s after scancel"
  stopped_at=$(stop_checkpoint_step "$out/logs/attempt0-task0.log" "$out")
  resubmit_resumes "$name" "$out" "$steps" "$stopped_at"
  say "$name: PASS in $((SECONDS - start)) s (stop checkpoint at step $stopped_at, resumed from it)"
}

check_term_clean() {
  local name=term-clean start=$SECONDS out=$WORK/term-clean steps=12 stopped_at exit_code
  start_tiny_train "$name" "$out" "$steps" "scancel --signal=TERM (then a resubmission)"
  # SIGTERM to every process of the job's steps (torchrun and its workers), not to the batch shell
  # or srun; no SIGKILL follows: the job must stop by itself.
  scancel --signal=TERM "$JOB"
  expect_completed "$JOB" 0 600
  exit_code=$(job_field "$JOB" ExitCode)
  [[ $exit_code == 0:0 ]] || fail "job $JOB ended with exit code $exit_code, expected 0:0"
  stopped_at=$(stop_checkpoint_step "$out/logs/attempt0-task0.log" "$out")
  expect_in "$WORK/slurm-check-$name-$JOB.out" "step ended with exit code 0"
  resubmit_resumes "$name" "$out" "$steps" "$stopped_at"
  say "$name: PASS in $((SECONDS - start)) s (COMPLETED 0:0 with a stop checkpoint at step $stopped_at, resumed from it)"
}

check_gopd_tiny() {
  local name=gopd-tiny start=$SECONDS out=$WORK/gopd-tiny steps=6
  need_gopd_train
  JOB=$(OUTPUT_DIR=$out CONFIG=examples/configs/tiny_multi_teacher.yaml GPUS_PER_NODE=4 \
        submit "$name" examples/slurm/single_node.sbatch --time=30 -- "steps=$steps" save_every=1)
  say "$name: job $JOB (gopd-train, 4 workers); signalling it after its second checkpoint"
  wait_for_file "$out/checkpoints/step_000002" 900 || fail "no second checkpoint"
  scancel --batch --signal=USR1 "$JOB"
  expect_completed "$JOB" 1 1800
  expect_in "$out/logs/attempt1-task0.log" "resumed from"
  expect_steps_once "$out" "$steps"
  say "$name: PASS in $((SECONDS - start)) s"
}

start=$SECONDS
tools/slurm_localhost.sh start
say "outputs in $WORK"
for check in "${CHECKS[@]}"; do
  case $check in
    smoke-single) check_smoke smoke-single examples/slurm/single_node.sbatch ;;
    smoke-multi) check_smoke smoke-multi examples/slurm/multi_node.sbatch --nodes=1 ;;
    smoke-tasks) check_smoke smoke-tasks examples/slurm/task_per_gpu.sbatch --nodes=1 --ntasks-per-node=2 ;;
    requeue-signal) check_requeue_signal requeue-signal ;;
    requeue-old-torchrun) check_requeue_signal requeue-old-torchrun \
                            PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT ;;
    requeue-admin) check_requeue_admin ;;
    time-limit) check_time_limit ;;
    preempt-group) check_preempt_group ;;
    cancel-group) check_cancel_group ;;
    term-clean) check_term_clean ;;
    gopd-tiny) check_gopd_tiny ;;
    *) fail "unknown check '$check'" ;;
  esac
done
say "${#CHECKS[@]} Slurm checks passed in $((SECONDS - start)) s"
