#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for testing the sbatch templates in examples/slurm/.
#
#   tools/slurm_localhost.sh start    install (first time), configure and start munge, slurmctld, slurmd;
#                                     returns once the node is idle and accepts jobs
#   tools/slurm_localhost.sh status   say whether the daemons run and show sinfo (exit 1 when down)
#   tools/slurm_localhost.sh stop     stop the daemons this script started (by their pid files)
#
# Needs root and the Debian package archive (apt-get). Idempotent: `start` on a running cluster only
# checks it; a changed machine (hostname, cores, memory) gets a rewritten slurm.conf and a restart.
# Uses Debian's slurm-wlm (Slurm 22.05 on bookworm) without cgroups or accounting: proctrack/linuxproc,
# task/none, one partition `debug` holding this node. Logs: /var/log/slurm/{slurmctld,slurmd}.log.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE_DIR=/var/lib/slurm
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

log() { printf '[slurm-localhost] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

running() {  # running PIDFILE: the process named in PIDFILE is alive
  [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  [[ $(id -u) -eq 0 ]] || die "installing slurm-wlm needs root"
  log "installing slurm-wlm and munge with apt-get (a few minutes the first time)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Keep the packages' init scripts from starting daemons (there may be no init system); we start them.
  local policy=/usr/sbin/policy-rc.d had_policy=0
  [[ -e $policy ]] && had_policy=1
  [[ $had_policy -eq 1 ]] || printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
    || { [[ $had_policy -eq 1 ]] || rm -f "$policy"; die "apt-get install slurm-wlm munge failed"; }
  [[ $had_policy -eq 1 ]] || rm -f "$policy"
}

write_config() {  # writes slurm.conf; prints "changed" when its content changed
  local host cpus mem_mb
  host=$(hostname -s)
  cpus=$(nproc)
  mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)  # leave 10% to the OS
  mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
  local new
  new=$(cat <<EOF
# Written by tools/slurm_localhost.sh: a one-node test cluster on localhost. Edits are overwritten.
ClusterName=localhost
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
# A killed job's processes get 30 s after SIGTERM (Slurm's default) to write a stop checkpoint;
# finished jobs stay visible to scontrol for 10 minutes (there is no accounting database for sacct).
KillWait=30
MinJobAge=600
# A requeued job waits cred_expire + 1 s before it may start again (default 120 s); 10 s here.
AuthInfo=cred_expire=10
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
# Preemption as on shared clusters: a job in partition urgent (higher PriorityTier) that needs the node
# requeues the debug jobs running there. They get SIGCONT + SIGTERM at once (every process of their
# steps), then SIGTERM + SIGKILL to the whole job GraceTime seconds later.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=120
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2
EOF
)
  if [[ ! -f $CONF ]] || [[ $(cat "$CONF") != "$new" ]]; then
    printf '%s\n' "$new" >"$CONF"
    echo changed
  fi
}

start_munge() {
  if running "$MUNGE_PID"; then return; fi
  [[ -s /etc/munge/munge.key ]] || {
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then mungekey --create --force; else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  }
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 755 /run/munge
  log "starting munged"
  su -s /bin/sh munge -c "munged --pid-file=$MUNGE_PID" || die "munged did not start"
  for _ in $(seq 20); do munge -n | unmunge >/dev/null 2>&1 && return; sleep 0.5; done
  die "munge -n | unmunge fails"
}

wait_for_idle() {
  local state
  for _ in $(seq 60); do
    state=$(sinfo --noheader --Node --format=%t 2>/dev/null | head -n 1 || true)
    case $state in
      idle|mix|alloc) log "node $(hostname -s) is $state"; return ;;
      down*|drain*|fail*) scontrol update NodeName="$(hostname -s)" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
  done
  die "the node did not become idle (state '${state:-?}'); see $LOG_DIR/slurmctld.log and slurmd.log"
}

start() {
  install_packages
  local changed
  changed=$(write_config)
  start_munge
  if [[ -n $changed ]] && { running "$CTLD_PID" || running "$SLURMD_PID"; }; then
    log "slurm.conf changed: restarting the daemons"
    stop_daemons
  fi
  if ! running "$CTLD_PID"; then
    log "starting slurmctld"
    slurmctld || die "slurmctld did not start; see $LOG_DIR/slurmctld.log"
  fi
  if ! running "$SLURMD_PID"; then
    log "starting slurmd"
    slurmd || die "slurmd did not start; see $LOG_DIR/slurmd.log"
  fi
  wait_for_idle
}

stop_pidfile() {  # stop_pidfile PIDFILE NAME
  if running "$1"; then
    local pid
    pid=$(cat "$1")
    log "stopping $2 (pid $pid)"
    kill "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -f "$1"
}

stop_daemons() {
  stop_pidfile "$SLURMD_PID" slurmd
  stop_pidfile "$CTLD_PID" slurmctld
}

status() {
  local ok=0
  for pair in "munged:$MUNGE_PID" "slurmctld:$CTLD_PID" "slurmd:$SLURMD_PID"; do
    if running "${pair#*:}"; then
      log "${pair%%:*} runs (pid $(cat "${pair#*:}"))"
    else
      log "${pair%%:*} is down"
      ok=1
    fi
  done
  [[ $ok -eq 0 ]] && sinfo
  return "$ok"
}

case ${1:-start} in
  start) start ;;
  stop) stop_daemons; stop_pidfile "$MUNGE_PID" munged ;;
  status) status ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
