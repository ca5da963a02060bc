# shellcheck shell=bash
# slurm/common.sh -- the one script behind slurm/stage{1,2,3}.sh, which only add their #SBATCH
# defaults (sbatch reads those from the file it is given) and `exec` this script.
#
#   export LTSCALE_RUN_DIR=/shared/runs/exp1 LTSCALE_CONFIG=configs/tiny.yaml
#   sbatch [-N 4] [--gpus-per-node=4] [-p PART] [-t 12:00:00] slurm/stage2.sh [key=value ...]
#
# Entry points (run as a script):
#   bash slurm/common.sh stage N [override ...]   the batch shell of a stage job (on the first node)
#   bash slurm/common.sh node -- ARGS...          one srun task per node: starts this node's launcher
#
# What a stage job does, in order (each step says why in its function):
#   1. read and check its inputs (LTSCALE_RUN_DIR, LTSCALE_CONFIG, ...) -> exit 2 with one clear
#      line in the job log on bad input, before any rank starts;
#   2. stage bookkeeping, asked of ltscale/rundir.py (the trainer's own rule, torch-free): stage N
#      already complete -> no-op, exit 0; stage N-1 not complete -> exit 2 naming its COMPLETE
#      marker, in a second instead of after every rank has imported torch;
#   3. `python -m launcher` (launcher/) turns the allocation into a DeepSpeed hostfile and, on each
#      node, a `deepspeed --no_ssh --node_rank R ...` (or torchrun) command -- no ssh, no pdsh;
#   4. `srun --ntasks-per-node=1` runs that command once per node, in the background, so the batch
#      shell can trap signals while it waits (bash runs traps only between foreground commands);
#   5. stop signals: SIGUSR1 (the `--signal=B:USR1@lead` warning) or SIGTERM reaching the batch shell
#      are forwarded to the step as SIGUSR1 via srun, which hands them to every process of the
#      step.  Launchers ignore SIGUSR1/SIGTERM (the node wrapper starts them with both ignored), so
#      only the training ranks react: they agree at the next step boundary, checkpoint, exit 143;
#   6. the code each node's launcher exited with decides: complete, requeue (a stop signal, a lost
#      rank) or fail (slurm/requeue.sh).
#
# Environment read by a stage job (sbatch exports the submitting shell's; README.md, section
# "Slurm", documents each for users): LTSCALE_RUN_DIR and LTSCALE_CONFIG (required), LTSCALE_ARGS,
# LTSCALE_NPROC_PER_NODE, LTSCALE_LAUNCHER (deepspeed|torchrun), LTSCALE_MASTER_ADDR,
# LTSCALE_MASTER_PORT, LTSCALE_PYTHON, LTSCALE_MAX_RESTARTS, LTSCALE_SEEDS (with job arrays),
# LTSCALE_SRUN_ARGS (after, so overriding, the step's --mpi=none --cpus-per-task --mem=0),
# LTSCALE_REPO, LTSCALE_RESIGNAL_S.
#
# Logs: everything goes to Slurm's output file and to RUN_DIR/logs/<job name>-<job id>.out
# (--open-mode=append keeps one file across requeues); RUN_DIR/logs/exit-codes/<job id>.<restart>/
# holds the code each node's launcher exited with.

LTSCALE_EXIT_USAGE=2      # bad input / stage order: same code as ltscale/train.py
LTSCALE_EXIT_LOST_RANK=4  # ltscale/train.py: lost contact with another rank; resumable
LTSCALE_EXIT_STOPPED=143  # ltscale/train.py: every rank checkpointed at a step boundary, then stopped
LTSCALE_RESIGNAL_S=${LTSCALE_RESIGNAL_S:-30}  # re-send the stop signal this often until the ranks stop
LTSCALE_STEP_GRACE_S=5    # no stop signal to a step younger than this: its node wrappers may not ignore it yet
LTSCALE_NODE_GRACE_S=60   # after one node's launcher ends, the others' time to end on their own

ltscale_log() { echo "[ltscale-slurm $(date +%H:%M:%S)] $*"; }
ltscale_err() { echo "[ltscale-slurm $(date +%H:%M:%S)] ERROR: $*" >&2; }
ltscale_die() {  # ltscale_die CODE MESSAGE
  ltscale_err "$2"
  exit "$1"
}

# shellcheck source=slurm/requeue.sh
source "$(dirname "${BASH_SOURCE[0]}")/requeue.sh"

# ------------------------------------------------------------------------------------- inputs

ltscale_python() {
  # The interpreter that has ltscale + deepspeed: explicit, else the repo's venv (what `make
  # install` builds), else python3 from PATH (an activated venv is exported to the job by sbatch).
  if [ -n "${LTSCALE_PYTHON:-}" ]; then
    echo "$LTSCALE_PYTHON"
  elif [ -x "$LTSCALE_REPO/.venv/bin/python" ]; then
    echo "$LTSCALE_REPO/.venv/bin/python"
  else
    command -v python3 || echo python3
  fi
}

ltscale_launcher() {  # python -m launcher ..., run from the repo
  # From the repo, not the submit dir: `python -m` puts the working dir first on sys.path, and a
  # launcher.py or launcher/ next to the user's job files would shadow ours.
  (cd "$LTSCALE_REPO" && "$PY" -m launcher "$@")
}

ltscale_ask() {  # ltscale_ask QUERY ARG...: `python -m ltscale.rundir`, the run dir layout's owner
  # Paths and stage state are asked, not spelled here, so the shell and the trainer cannot drift.
  (cd "$LTSCALE_REPO" && "$PY" -m ltscale.rundir "$@")
}

ltscale_abspath() {  # relative paths are relative to the job's working dir (the submit dir)
  case "$1" in
    /*) echo "$1" ;;
    *) echo "$PWD/$1" ;;
  esac
}

ltscale_resolve_inputs() {  # sets RUN_DIR CONFIG SEED PY TRAIN_ARGS (array) from the environment
  local stage=$1
  shift
  [ -n "${SLURM_JOB_ID:-}" ] ||
    ltscale_die "$LTSCALE_EXIT_USAGE" "not inside a Slurm job: submit this script with sbatch (README.md, section Slurm)"
  [ -n "${LTSCALE_RUN_DIR:-}" ] ||
    ltscale_die "$LTSCALE_EXIT_USAGE" "LTSCALE_RUN_DIR is not set: export LTSCALE_RUN_DIR=/shared/path/run before sbatch (the run dir must be on storage every node sees)"
  [ -n "${LTSCALE_CONFIG:-}" ] ||
    ltscale_die "$LTSCALE_EXIT_USAGE" "LTSCALE_CONFIG is not set: export LTSCALE_CONFIG=configs/<name>.yaml before sbatch"
  CONFIG=$(ltscale_abspath "$LTSCALE_CONFIG")
  # A relative config that is not under the submit dir is looked up in the repo (configs/...).
  if [ ! -f "$CONFIG" ] && [ "${LTSCALE_CONFIG#/}" = "$LTSCALE_CONFIG" ] && [ -f "$LTSCALE_REPO/$LTSCALE_CONFIG" ]; then
    CONFIG=$LTSCALE_REPO/$LTSCALE_CONFIG
  fi
  [ -f "$CONFIG" ] ||
    ltscale_die "$LTSCALE_EXIT_USAGE" "LTSCALE_CONFIG=$LTSCALE_CONFIG: no such file (looked in $PWD and $LTSCALE_REPO)"
  BASE_RUN_DIR=$(ltscale_abspath "$LTSCALE_RUN_DIR")
  RUN_DIR=$BASE_RUN_DIR

  # Seeds: one array task per seed, each in RUN_DIR/seed<S> with train.seed=S (pipeline.sh).
  SEED=
  if [ -n "${LTSCALE_SEEDS:-}" ]; then
    local seeds
    read -r -a seeds <<<"$LTSCALE_SEEDS"
    if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
      [ "$SLURM_ARRAY_TASK_ID" -lt "${#seeds[@]}" ] ||
        ltscale_die "$LTSCALE_EXIT_USAGE" "array task $SLURM_ARRAY_TASK_ID but LTSCALE_SEEDS has ${#seeds[@]} seeds ($LTSCALE_SEEDS): submit with --array=0-$((${#seeds[@]} - 1))"
      SEED=${seeds[$SLURM_ARRAY_TASK_ID]}
    elif [ "${#seeds[@]}" -eq 1 ]; then
      SEED=${seeds[0]}
    else
      ltscale_die "$LTSCALE_EXIT_USAGE" "LTSCALE_SEEDS has ${#seeds[@]} seeds but this is not an array job: submit with --array=0-$((${#seeds[@]} - 1)) (slurm/pipeline.sh does)"
    fi
    [[ $SEED =~ ^[0-9]+$ ]] || ltscale_die "$LTSCALE_EXIT_USAGE" "LTSCALE_SEEDS: '$SEED' is not a non-negative integer"
    RUN_DIR=$BASE_RUN_DIR/seed$SEED
  fi

  PY=$(ltscale_python)
  case "$PY" in
    */*) PY=$(ltscale_abspath "$PY") ;;
    *) PY=$(command -v "$PY" 2>/dev/null || echo "$PY") ;;
  esac
  [ -x "$PY" ] ||
    ltscale_die "$LTSCALE_EXIT_USAGE" "python '$PY' not found: set LTSCALE_PYTHON or run 'make install' in $LTSCALE_REPO"

  # Trainer arguments: config, stage, overrides. LTSCALE_ARGS is split on whitespace (values with
  # spaces go as script arguments instead); run_dir comes last so the job's run dir always wins.
  local extra=()
  [ -n "${LTSCALE_ARGS:-}" ] && read -r -a extra <<<"$LTSCALE_ARGS"
  TRAIN_ARGS=(--config "$CONFIG" --stage "$stage" "${extra[@]+"${extra[@]}"}" "$@")
  [ -n "$SEED" ] && TRAIN_ARGS+=("train.seed=$SEED")
  TRAIN_ARGS+=("run_dir=$RUN_DIR")
  return 0
}

# ------------------------------------------------------------------------------------- logs

ltscale_setup_log() {
  # `#SBATCH --output` cannot name the run dir (no env vars there), so unless the job's output
  # already goes under it (pipeline.sh passes --output=RUN_DIR/logs/%x-%j.out), the batch shell
  # copies everything it and the ranks print into RUN_DIR/logs/<job name>-<job id>.out.
  # Appending keeps one log across requeues, like --open-mode=append does for Slurm's file.
  mkdir -p "$RUN_DIR/logs" ||
    ltscale_die "$LTSCALE_EXIT_USAGE" "cannot create $RUN_DIR/logs (LTSCALE_RUN_DIR=$LTSCALE_RUN_DIR)"
  local out
  out=$(readlink -f /proc/$$/fd/1 2>/dev/null || true)
  case "$out" in
    "$BASE_RUN_DIR"/*) LTSCALE_LOG=$out ;;
    *)
      local id=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
      LTSCALE_LOG=$RUN_DIR/logs/${SLURM_JOB_NAME:-ltscale}-${id:-$SLURM_JOB_ID}.out
      # tee ignores the stop signals: Slurm sends SIGTERM to every process of the batch step, and
      # a dead tee would take the batch shell and srun down with SIGPIPE while ranks checkpoint.
      exec > >(trap '' TERM USR1 INT HUP; exec tee -a "$LTSCALE_LOG") 2>&1
      LTSCALE_TEE_PID=$!
      # On exit, close our ends of the pipe and give tee a moment to write the last lines
      # (the error that explains a failure is usually the last line).
      trap 'ltscale_flush_log' EXIT
      ;;
  esac
}

ltscale_flush_log() {
  exec 1>&- 2>&-
  local i
  for ((i = 0; i < 50; i++)); do
    kill -0 "$LTSCALE_TEE_PID" 2>/dev/null || return 0
    sleep 0.1
  done
}

# ------------------------------------------------------------------------------------- stages

ltscale_check_stage_order() {  # exit 0 if stage N is complete, exit 2 if stage N-1 is not
  local stage=$1 state rc=0
  state=$(ltscale_ask check-stage "$RUN_DIR" "$stage" 2>&1) || rc=$?
  case "$rc $state" in
    "0 ready") ;;
    "0 complete")
      ltscale_log "stage $stage is already complete ($(ltscale_ask complete-file "$RUN_DIR" "$stage")); nothing to do"
      exit 0
      ;;
    "$LTSCALE_EXIT_USAGE stage "*)
      ltscale_die "$LTSCALE_EXIT_USAGE" "$state (sbatch slurm/stage$((stage - 1)).sh, or slurm/pipeline.sh which chains the stages with afterok)"
      ;;
    *) ltscale_die "$LTSCALE_EXIT_USAGE" "python -m ltscale.rundir check-stage $RUN_DIR $stage failed (exit $rc): $state" ;;
  esac
}

# ------------------------------------------------------------------------------------- launch

ltscale_launch_setup() {
  # Everything the per-node wrapper needs, exported so srun hands it to every node.
  export LTSCALE_REPO PY
  export LTSCALE_LAUNCHER=${LTSCALE_LAUNCHER:-deepspeed}
  case "$LTSCALE_LAUNCHER" in
    deepspeed | torchrun) ;;
    *) ltscale_die "$LTSCALE_EXIT_USAGE" "LTSCALE_LAUNCHER=$LTSCALE_LAUNCHER: expected deepspeed or torchrun" ;;
  esac

  # Master address: the first node, unless overridden. A name that does not resolve would make
  # every rank wait for a rendezvous that never happens, so refuse it here instead.
  local first
  first=$(cd "$LTSCALE_REPO" && "$PY" -c 'import os, launcher; print(launcher.master_addr(launcher.slurm_context(os.environ)))' 2>&1) ||
    ltscale_die "$LTSCALE_EXIT_USAGE" "cannot read the Slurm allocation: $first"
  export LTSCALE_MASTER_ADDR=${LTSCALE_MASTER_ADDR:-$first}
  if ! [[ $LTSCALE_MASTER_ADDR =~ ^[0-9.]+$|: ]] && ! getent hosts "$LTSCALE_MASTER_ADDR" >/dev/null 2>&1; then
    ltscale_die "$LTSCALE_EXIT_USAGE" "master node '$LTSCALE_MASTER_ADDR' does not resolve on $(hostname); set LTSCALE_MASTER_ADDR to its address (on slurm/local-cluster.sh: LTSCALE_MASTER_ADDR=127.0.0.1)"
  fi

  # DeepSpeed needs the same hostfile on every node (run dir = shared storage).
  LTSCALE_HOSTFILE=
  if [ "$LTSCALE_LAUNCHER" = deepspeed ]; then
    LTSCALE_HOSTFILE=$RUN_DIR/logs/hostfile-$SLURM_JOB_ID
    local slots=()
    [ -n "${LTSCALE_NPROC_PER_NODE:-}" ] && slots=(--slots "$LTSCALE_NPROC_PER_NODE")
    local text
    text=$(ltscale_launcher hostfile "${slots[@]+"${slots[@]}"}" 2>&1) ||
      ltscale_die "$LTSCALE_EXIT_USAGE" "$(ltscale_nproc_hint "$text")"
    printf '%s\n' "$text" >"$LTSCALE_HOSTFILE"
  fi
  export LTSCALE_HOSTFILE

  # Dry run of node 0's command in the batch shell: a bad allocation (no GPUs and no
  # LTSCALE_NPROC_PER_NODE, malformed node list) fails here with the launcher's message.
  local cmd
  cmd=$(ltscale_node_command "${TRAIN_ARGS[@]}" 2>&1) ||
    ltscale_die "$LTSCALE_EXIT_USAGE" "$(ltscale_nproc_hint "$cmd")"
  ltscale_log "node 0 command: $cmd"
}

ltscale_nproc_hint() {  # add the knob to the launcher's "no GPUs" message
  case "$1" in
    *"no GPUs found"*) echo "$1 (CPU partition: set LTSCALE_NPROC_PER_NODE=<ranks per node> and DS_ACCELERATOR=cpu)" ;;
    *) echo "$1" ;;
  esac
}

ltscale_node_command() {  # this node's launcher command line, shell-quoted, from `python -m launcher`
  local opts=(command --launcher "$LTSCALE_LAUNCHER" --python "$PY" --master-addr "$LTSCALE_MASTER_ADDR")
  [ -n "${LTSCALE_MASTER_PORT:-}" ] && opts+=(--master-port "$LTSCALE_MASTER_PORT")
  [ -n "${LTSCALE_NPROC_PER_NODE:-}" ] && opts+=(--nproc-per-node "$LTSCALE_NPROC_PER_NODE")
  [ -n "${LTSCALE_HOSTFILE:-}" ] && opts+=(--hostfile "$LTSCALE_HOSTFILE")
  ltscale_launcher "${opts[@]}" -- "$LTSCALE_REPO/ltscale/train.py" "$@"
}

ltscale_node_main() {  # bash slurm/common.sh node -- TRAIN_ARGS...: one srun task per node
  # SIGUSR1/SIGTERM are ignored here and therefore in the launcher processes started below (an
  # ignored disposition survives exec). Why: the deepspeed runner has no handler for either and
  # launch.py none for SIGUSR1, so the default action would kill them -- and with them the step --
  # while the ranks are still writing their checkpoint. The ranks install their own handlers
  # (ltscale.trainer.StopSignal); deepspeed's launch.py still handles SIGTERM by passing it on
  # to its ranks with a 30 s grace, which is what Slurm preemption (SIGTERM, KillWait later
  # SIGKILL) needs.
  trap '' USR1 TERM
  [ "${1:-}" = "--" ] && shift
  local quoted rc=0
  quoted=$(ltscale_node_command "$@") || rc=$LTSCALE_EXIT_USAGE
  if [ "$rc" -eq 0 ]; then
    local cmd
    eval "cmd=($quoted)"  # shlex.join output: POSIX-quoted words
    "${cmd[@]}" || rc=$?
  fi
  [ "$rc" -eq 0 ] || echo "[ltscale-slurm] node ${SLURM_NODEID:-?} ($(hostname)): launcher exited with $rc" >&2
  # The batch shell reads this, not srun's exit code: srun folds in the signal of every node it
  # killed (128 + 9 after --wait), which would hide a lost rank's 4.
  if [ -n "${LTSCALE_EXIT_DIR:-}" ]; then
    local f=$LTSCALE_EXIT_DIR/node${SLURM_NODEID:-0}
    { echo "$rc" >"$f.tmp" && mv -f "$f.tmp" "$f"; } 2>/dev/null || true
  fi
  exit "$rc"
}

# ------------------------------------------------------------------------------------- signals

ltscale_on_signal() {  # trap handler in the batch shell: remember, forward, keep waiting
  LTSCALE_STOP=${LTSCALE_STOP:-$1}
  [ "$1" = TERM ] && LTSCALE_STOP=TERM  # a TERM (preemption, scancel, time limit) overrides USR1
  ltscale_log "received SIG$1: asking every rank to checkpoint at the next step boundary"
  ltscale_request_stop_file
  ltscale_forward_stop
}

ltscale_request_stop_file() {
  # A rank still importing cannot take the signal yet; the trainer reads this file when it installs
  # its handler (ltscale/trainer.py StopSignal), so an early stop is not missed.
  if [ -n "${LTSCALE_STOP:-}" ] && [ -n "${LTSCALE_STOP_FILE:-}" ] && [ -d "$(dirname "$LTSCALE_STOP_FILE")" ]; then
    : >"$LTSCALE_STOP_FILE"
  fi
}

ltscale_forward_stop() {
  # SIGUSR1 to srun, which relays it to every process of the step on every node; only the ranks
  # act on it (the launchers ignore it). USR1 even when the batch shell got TERM: the ranks treat
  # both alike, and a TERM would make srun/launch.py tear the step down instead.
  # Not in the step's first seconds: srun relays to every task at once, and a node wrapper that has
  # not reached its `trap '' USR1` yet would die of it (exit 138) and take the step down. The
  # waiting loop forwards a stop that arrived meanwhile once the grace has passed.
  if [ -n "${LTSCALE_SRUN_PID:-}" ] && kill -0 "$LTSCALE_SRUN_PID" 2>/dev/null &&
    ((SECONDS - LTSCALE_SRUN_START >= LTSCALE_STEP_GRACE_S)); then
    kill -USR1 "$LTSCALE_SRUN_PID" 2>/dev/null || true
    LTSCALE_LAST_FORWARD=$SECONDS
  fi
}

ltscale_run_step() {  # srun the per-node wrapper in the background; sets LTSCALE_STEP_RC (ltscale_step_code)
  local srun_extra=()
  [ -n "${LTSCALE_SRUN_ARGS:-}" ] && read -r -a srun_extra <<<"$LTSCALE_SRUN_ARGS"
  # Site defaults the step must not take (LTSCALE_SRUN_ARGS comes after them, so it can):
  # --mpi=none: an MpiDefault=pmi2 site would export PMI_RANK/PMI_SIZE (this node's index) to every
  #   rank beside deepspeed's RANK; nothing here speaks PMI (ltscale/launch_env.py copes anyway).
  # --cpus-per-task: srun of Slurm 22.05-23.02 does not take the job's value from the environment,
  #   so the one task per node -- the launcher and all of the node's ranks -- would get one core.
  # --mem=0: the step may use all the memory the job has on each node.
  local defaults=(--mpi=none --mem=0)
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && defaults+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
  export LTSCALE_EXIT_DIR=$RUN_DIR/logs/exit-codes/$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}
  rm -rf "$LTSCALE_EXIT_DIR" && mkdir -p "$LTSCALE_EXIT_DIR"
  export LTSCALE_STOP_FILE=$LTSCALE_EXIT_DIR/stop-requested
  ltscale_request_stop_file
  # --wait: once one node's launcher has ended, the others get LTSCALE_NODE_GRACE_S to end too and
  # report their own code (a dead peer is seen within seconds; a stop ends every node together),
  # then srun kills them (SIGKILL), so a rank hanging in a collective cannot hold the job. Not
  # --kill-on-bad-exit: it would SIGTERM the other nodes at once, and deepspeed's launch.py answers
  # that with exit 1, hiding their ranks' 4 (a lost rank, requeued) behind what looks like a crash.
  local opts=(--nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1
    --kill-on-bad-exit=0 --wait="$LTSCALE_NODE_GRACE_S" --label "${defaults[@]}" "${srun_extra[@]+"${srun_extra[@]}"}")
  ltscale_log "training step: srun ${opts[*]}"
  srun "${opts[@]}" bash "$LTSCALE_REPO/slurm/common.sh" node -- "${TRAIN_ARGS[@]}" &
  LTSCALE_SRUN_PID=$!
  LTSCALE_SRUN_START=$SECONDS
  LTSCALE_LAST_FORWARD=
  # Poll instead of a bare `wait $pid`: traps run at once (wait returns on a signal). A stop that
  # arrived before srun existed, or in its first LTSCALE_STEP_GRACE_S s, is forwarded once that
  # grace has passed; then it is re-sent every LTSCALE_RESIGNAL_S s, because a rank still starting
  # up (imports, engine set-up) ignores it until the trainer installs its handler.
  while kill -0 "$LTSCALE_SRUN_PID" 2>/dev/null; do
    sleep 1 &
    wait $! 2>/dev/null || true
    if [ -n "${LTSCALE_STOP:-}" ] &&
      { [ -z "$LTSCALE_LAST_FORWARD" ] || ((SECONDS - LTSCALE_LAST_FORWARD >= LTSCALE_RESIGNAL_S)); }; then
      ltscale_forward_stop
    fi
  done
  local srun_rc=0 codes=()
  wait "$LTSCALE_SRUN_PID" || srun_rc=$?
  LTSCALE_SRUN_PID=
  local f
  for f in "$LTSCALE_EXIT_DIR"/node*; do
    if [ -f "$f" ]; then codes+=("$(cat "$f")"); fi
  done
  LTSCALE_STEP_RC=$(ltscale_step_code "$srun_rc" "${codes[@]+"${codes[@]}"}")
  [ "$LTSCALE_STEP_RC" = "$srun_rc" ] || ltscale_log "srun exited with $srun_rc; the nodes' launchers with ${codes[*]}"
}

ltscale_log_time_limit() {  # one line that explains a later lead-time signal
  local limits
  limits=$(squeue -h -j "$SLURM_JOB_ID" -o '%l %L' 2>/dev/null || true)
  [ -n "$limits" ] && ltscale_log "time limit ${limits% *}, left ${limits#* } (the --signal lead must be shorter than what is left)"
  return 0
}

# ------------------------------------------------------------------------------------- main

ltscale_stage_main() {  # ltscale_stage_main N [override ...]
  local stage=$1
  shift
  LTSCALE_STOP=
  # Installed first: a signal during the checks below is remembered and acted on.
  trap 'ltscale_on_signal USR1' USR1
  trap 'ltscale_on_signal TERM' TERM

  ltscale_resolve_inputs "$stage" "$@"
  ltscale_setup_log
  ltscale_log "job ${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)} stage $stage restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NUM_NODES} node(s) ${SLURM_JOB_NODELIST}"
  ltscale_log "run dir $RUN_DIR${SEED:+ (seed $SEED)}; config $CONFIG; log $LTSCALE_LOG"
  ltscale_check_stage_order "$stage"
  [ -z "${LTSCALE_NPROC_PER_NODE:-}" ] || [[ $LTSCALE_NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] ||
    ltscale_die "$LTSCALE_EXIT_USAGE" "LTSCALE_NPROC_PER_NODE=$LTSCALE_NPROC_PER_NODE is not a positive integer"
  ltscale_launch_setup
  ltscale_log_time_limit

  local latest_before
  latest_before=$(ltscale_latest_checkpoint "$stage" 1) || exit
  ltscale_run_step
  ltscale_log "training step ended with exit code $LTSCALE_STEP_RC${LTSCALE_STOP:+ (after SIG$LTSCALE_STOP)}"
  ltscale_end_job "$stage" "$LTSCALE_STEP_RC" "$latest_before"
}

# Run as a script: a stage job's batch shell (exec'd by slurm/stage{1,2,3}.sh) or, inside srun, the
# per-node wrapper. The checkout is the one this file is in.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  LTSCALE_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  case "${1:-} ${2:-}" in
    "stage "[1-9]*)
      shift
      ltscale_stage_main "$@"
      ;;
    "node "*)
      shift
      PY=${PY:-$(ltscale_python)}
      ltscale_node_main "$@"
      ;;
    *)
      echo "usage: bash slurm/common.sh stage N [key=value ...]   (what slurm/stageN.sh runs under sbatch)" >&2
      echo "       bash slurm/common.sh node -- TRAIN_ARGS...     (the per-node wrapper inside srun)" >&2
      exit 2
      ;;
  esac
fi
