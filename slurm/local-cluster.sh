#!/usr/bin/env bash
# slurm/local-cluster.sh start|stop|status|restart -- a throwaway Slurm cluster on this one host.
# `start` returns once every node is idle (exit 1 with the daemon logs if not within 60 s);
# `status` exits 0 only if every daemon is up; `stop` exits 0 also when nothing runs.
#
# For trying the stage scripts on a workstation and for CI (tests/slurm/): munge + slurmctld +
# N slurmd "nodes" (n1..nN), all on 127.0.0.1, all state under one directory.  Run as root.
#
#   sudo slurm/local-cluster.sh start          # installs slurmctld/slurmd/slurm-client/munge if missing
#   export SLURM_CONF=/tmp/ltscale-slurm/slurm.conf   # (only needed with LTSCALE_SLURM_ETC=0)
#   LTSCALE_MASTER_ADDR=127.0.0.1 ... sbatch -N 2 slurm/stage1.sh
#   sudo slurm/local-cluster.sh stop           # cancels jobs, stops the daemons, removes the dir
#
# Knobs (environment):
#   LTSCALE_SLURM_DIR      state/config/log dir              (default /tmp/ltscale-slurm)
#   LTSCALE_SLURM_NODES    simulated nodes n1..nN            (default 2)
#   LTSCALE_SLURM_CPUS     CPUs advertised per node          (default: cores of this host)
#   LTSCALE_SLURM_MEM      RealMemory per node, MB           (default 4096)
#   LTSCALE_SLURM_PORT     slurmctld port; node k listens on PORT+k   (default 6817)
#   LTSCALE_SLURM_INSTALL  0: never apt-get install          (default 1)
#   LTSCALE_SLURM_ETC      0: do not write /etc/slurm/slurm.conf (then export SLURM_CONF)  (default 1)
#   LTSCALE_SLURM_KEEP     1: keep the dir (logs) on stop    (default 0)
#
# Why it looks like this (verified on Debian 12, Slurm 22.05, no systemd):
# * Several slurmd on one host: Debian builds Slurm with MULTIPLE_SLURMD, so nodes n1..nN share
#   NodeHostname=localhost/NodeAddr=127.0.0.1 and differ by Port=; each slurmd runs with -N <node>
#   and gets its own spool dir, pid file and log through %n.
# * AuthInfo=cred_expire=10: a requeued job cannot restart before the job credential expires
#   (default 120 s), which would make every requeue test wait two minutes.
# * SlurmdParameters=config_overrides: the advertised CPUs/memory need not match the hardware.
# * proctrack/linuxproc + task/none: no cgroups needed (none are delegated in a CI container).
# * The node names do not resolve: jobs must use LTSCALE_MASTER_ADDR=127.0.0.1 (the stage scripts
#   refuse an unresolvable master rather than hang).
# * Idempotent: every daemon is started only if its pid file does not name a live process, and
#   `stop` signals only pids from this directory's pid files (munged only if we started it), so it
#   is safe after a failed start, twice in a row, and next to a munged someone else runs.
set -euo pipefail

DIR=${LTSCALE_SLURM_DIR:-/tmp/ltscale-slurm}
NODES=${LTSCALE_SLURM_NODES:-2}
CPUS=${LTSCALE_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}
MEM=${LTSCALE_SLURM_MEM:-4096}
PORT=${LTSCALE_SLURM_PORT:-6817}
INSTALL=${LTSCALE_SLURM_INSTALL:-1}
ETC=${LTSCALE_SLURM_ETC:-1}
KEEP=${LTSCALE_SLURM_KEEP:-0}

CONF=$DIR/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
MARKER="# managed-by: ltscale slurm/local-cluster.sh"
MUNGE_SOCKET=/run/munge/munge.socket.2
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "local-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

nodes() {  # n1 n2 ... nN
  local i
  for ((i = 1; i <= NODES; i++)); do echo "n$i"; done
}

pid_alive() {  # pid_alive PIDFILE: the file names a running process
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

# ------------------------------------------------------------------------------------ install

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$INSTALL" = 1 ] || die "missing packages ${missing[*]} and LTSCALE_SLURM_INSTALL=0"
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get; install Slurm 22.05+ and munge"
  log "installing ${missing[*]}"
  apt-get update -qq >&2
  # Debian's postinst scripts do not start daemons without systemd, so nothing else runs.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# ------------------------------------------------------------------------------------ config

write_conf() {
  local last=$((PORT + NODES)) tmp
  tmp=$(mktemp "$DIR/slurm.conf.XXXXXX")
  cat >"$tmp" <<EOF
$MARKER (dir $DIR)
ClusterName=ltscale-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2,kill_invalid_depend
MinJobAge=3600
KillWait=30
OverTimeLimit=0
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
JobRequeue=1
MaxArraySize=1001
NodeName=n[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$((PORT + 1))-$last] CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  mv -f "$tmp" "$CONF"
  chmod 644 "$CONF"
  if [ "$ETC" = 1 ]; then
    # Never overwrite a foreign slurm.conf, nor the one of another live local cluster.
    local owner=
    [ -e "$ETC_CONF" ] && owner=$(sed -n "s|^$MARKER (dir \(.*\))\$|\1|p" "$ETC_CONF" | head -n 1)
    if [ -e "$ETC_CONF" ] && [ -z "$owner" ]; then
      log "not touching $ETC_CONF (not written by this script); use: export SLURM_CONF=$CONF"
    elif [ -n "$owner" ] && [ "$owner" != "$DIR" ] && pid_alive "$owner/run/slurmctld.pid"; then
      log "not touching $ETC_CONF (it belongs to the cluster in $owner); use: export SLURM_CONF=$CONF"
    else
      mkdir -p "$(dirname "$ETC_CONF")"
      cp -f "$CONF" "$ETC_CONF"
    fi
  fi
}

# ------------------------------------------------------------------------------------ munge

munge_ok() { [ -S "$MUNGE_SOCKET" ] && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_ok; then return 0; fi  # someone's munged already answers: reuse it, never stop it
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  rm -f "$MUNGE_SOCKET"  # a stale socket from a killed munged makes munged refuse to start
  runuser -u munge -- /usr/sbin/munged
  local i
  for ((i = 0; i < 50; i++)); do
    if [ -s /run/munge/munged.pid ] && munge_ok; then
      cp /run/munge/munged.pid "$DIR/run/munged.pid"  # marks: we started it, `stop` may stop it
      return 0
    fi
    sleep 0.2
  done
  die "munged did not come up (see /var/log/munge/munged.log)"
}

# ------------------------------------------------------------------------------------ daemons

export_conf() { export SLURM_CONF=$CONF; }

start_daemons() {
  local n
  if ! pid_alive "$DIR/run/slurmctld.pid"; then
    slurmctld -f "$CONF"
  fi
  for n in $(nodes); do
    mkdir -p "$DIR/spool/$n"
    if ! pid_alive "$DIR/run/slurmd-$n.pid"; then
      slurmd -f "$CONF" -N "$n"
    fi
  done
}

wait_idle() {  # until every node is idle/mixed/allocated; revive nodes left DOWN by an earlier run
  local i state bad n
  for ((i = 0; i < 120; i++)); do
    bad=0
    state=$(sinfo -h -N -o '%N %T' 2>/dev/null) || bad=1
    if [ "$bad" = 0 ]; then
      for n in $(nodes); do
        grep -Eq "^$n (idle|mixed|allocated|completing)" <<<"$state" || bad=1
      done
      [ "$bad" = 0 ] && return 0
    fi
    if ((i % 10 == 9)); then
      for n in $(nodes); do scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true; done
    fi
    sleep 0.5
  done
  return 1
}

show_failure() {  # show_failure WHAT: sinfo and the tail of every log
  log "$1"
  sinfo -N -l >&2 || true
  local f
  for f in "$DIR"/log/*.log; do
    [ -f "$f" ] || continue
    echo "----- $f (last 20 lines)" >&2
    tail -n 20 "$f" >&2
  done
}

cmd_start() {
  [ "$(id -u)" -eq 0 ] || die "run as root (slurmd and munged need it)"
  [[ $NODES =~ ^[1-9][0-9]*$ ]] || die "LTSCALE_SLURM_NODES=$NODES is not a positive integer"
  install_packages
  mkdir -p "$DIR"/{state,spool,run,log}
  write_conf
  start_munge
  export_conf
  start_daemons
  if ! wait_idle; then
    show_failure "the nodes did not become idle within 60 s"
    exit 1
  fi
  # Idle nodes could also be another cluster answering on the same ports (ours then failed to
  # bind and exited): every daemon from our pid files must be alive.
  local f
  for f in "$DIR/run/slurmctld.pid" $(nodes | sed "s|^|$DIR/run/slurmd-|; s|\$|.pid|"); do
    if ! pid_alive "$f"; then
      show_failure "$(basename "$f" .pid) exited"
      die "$(basename "$f" .pid) is not running (port $PORT..$((PORT + NODES)) taken by another Slurm?)"
    fi
  done
  log "up: $NODES node(s) n[1-$NODES], $CPUS CPUs and ${MEM} MB each, conf $CONF"
  [ "$ETC" = 1 ] || log "export SLURM_CONF=$CONF"
  log "jobs must use LTSCALE_MASTER_ADDR=127.0.0.1 (the node names do not resolve)"
}

stop_pids() {  # stop_pids PIDFILE...: SIGTERM, wait up to 10 s, SIGKILL; remove the pid files
  local f pid pids=() i
  for f in "$@"; do
    if pid_alive "$f"; then pids+=("$(cat "$f")"); fi
  done
  if [ ${#pids[@]} -gt 0 ]; then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      kill -0 "${pids[@]}" 2>/dev/null || break
      sleep 0.2
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  rm -f "$@"
}

tree_pids() {  # tree_pids PID: PID and all its descendants (from /proc: no procps needed)
  local pairs=() f rest todo=("$1") pid
  for f in /proc/[0-9]*/stat; do
    rest=$(cat "$f" 2>/dev/null) || continue
    rest=${rest##*) }  # after "pid (comm) ": "state ppid ..."; comm may contain spaces
    rest=${rest#* }
    pairs+=("${rest%% *}:$(basename "$(dirname "$f")")")  # "ppid:pid"
  done
  while [ ${#todo[@]} -gt 0 ]; do
    pid=${todo[0]}
    todo=("${todo[@]:1}")
    echo "$pid"
    for f in "${pairs[@]}"; do
      if [ "${f%%:*}" = "$pid" ]; then todo+=("${f#*:}"); fi
    done
  done
}

stepd_pids() {  # slurmstepd processes of this cluster: they run in our log dir (slurmd's cwd)
  local p
  for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
    case "$(readlink "$p/cwd" 2>/dev/null)" in
      "$DIR"/*) echo "${p#/proc/}" ;;
    esac
  done
}

cmd_stop() {
  [ "$(id -u)" -eq 0 ] || die "run as root"
  if [ ! -d "$DIR" ]; then
    log "nothing to stop ($DIR does not exist)"
    return 0
  fi
  export_conf
  # Jobs first, while slurmd still runs: it lets the steps stop (KillWait=30 s) and reaps them.
  if pid_alive "$DIR/run/slurmctld.pid"; then
    local jobs i
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      log "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
      # shellcheck disable=SC2086  # one id per word
      scancel --quiet $jobs 2>/dev/null || true
      for ((i = 0; i < 90; i++)); do
        [ -z "$(squeue -h -o %A 2>/dev/null || true)" ] && break
        sleep 0.5
      done
    fi
  fi
  local files=("$DIR/run/slurmctld.pid") n
  for n in $(nodes) $(ls "$DIR/spool" 2>/dev/null); do files+=("$DIR/run/slurmd-$n.pid"); done
  stop_pids "${files[@]}"
  # A step that outlived its slurmd (stuck past KillWait) would survive it: kill its slurmstepd.
  local left pid
  left=$(stepd_pids)
  if [ -n "$left" ]; then
    log "killing leftover job steps (slurmstepd $(tr '\n' ' ' <<<"$left")and their processes)"
    for pid in $left; do
      # shellcheck disable=SC2046  # one pid per word
      kill -KILL $(tree_pids "$pid") 2>/dev/null || true
    done
  fi
  stop_pids "$DIR/run/munged.pid"  # only exists if start launched munged
  if [ -f "$ETC_CONF" ] && grep -qF "$MARKER (dir $DIR)" "$ETC_CONF"; then rm -f "$ETC_CONF"; fi
  if [ "$KEEP" = 1 ]; then
    log "stopped; kept $DIR"
  else
    rm -rf "$DIR"
    log "stopped; removed $DIR"
  fi
}

cmd_status() {
  if [ ! -d "$DIR/run" ]; then
    log "not running ($DIR/run does not exist)"
    return 3
  fi
  local f rc=0
  for f in "$DIR"/run/*.pid; do
    [ -e "$f" ] || continue
    if pid_alive "$f"; then echo "$(basename "$f" .pid): up (pid $(cat "$f"))"; else echo "$(basename "$f" .pid): dead"; rc=3; fi
  done
  export_conf
  sinfo -N -l || rc=3
  return "$rc"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  restart) cmd_stop; cmd_start ;;
  *) echo "usage: $0 start|stop|status|restart   (see the header for LTSCALE_SLURM_* knobs)" >&2; exit 2 ;;
esac
