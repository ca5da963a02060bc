# shellcheck shell=bash
# slurm/requeue.sh -- sourced by slurm/common.sh: how a stage job's training step ended and what
# the job does then (docs/RELIABILITY.md, "Requeue under Slurm", has the table).
#
# The step's code is the one each node's launcher exited with (srun's own code mixes in the nodes
# it had to kill after the first one ended); then:
#   - 0 -> the job completes, if the trainer wrote the stage's COMPLETE marker;
#   - 143 after a SIGUSR1 (the --signal=B:USR1@lead warning, or one sent straight to the step) ->
#     `scontrol requeue $SLURM_JOB_ID` (bounded by LTSCALE_MAX_RESTARTS); the requeued job keeps its
#     id (afterok dependents keep waiting) and resumes exactly;
#   - 4, a lost rank (ltscale/train.py: a peer died, hung or became unreachable) -> requeue the same
#     way, the run is resumable by design; but not twice at the same checkpoint: a failure that
#     recurs before any progress is not transient;
#   - after a SIGTERM Slurm itself decides (preemption requeues the job; scancel or the time limit
#     end it), so the script never requeues then: `scancel` must stay a way to stop a job;
#   - any other non-zero exit fails the job: a crash must not loop.

ltscale_step_code() {  # ltscale_step_code SRUN_RC [NODE_RC ...]: the one code that says how the step ended
  # The nodes' own codes beat srun's. Among them: a trainer error (1..127 except 4: a crash, bad
  # input, too many skipped steps) names the cause; else a lost rank (4), whose neighbours report
  # the signal that ended them (>= 128: killed by srun, the OOM killer, a crashed rank); else a
  # stop (143); else the largest. All 0 (or none reported) leaves srun's code.
  local srun_rc=$1 c want max=0
  shift
  for c in "$@"; do
    if ((c > 0 && c < 128 && c != 4)); then
      echo "$c"
      return
    fi
    if ((c > max)); then max=$c; fi
  done
  for want in 4 143; do
    for c in "$@"; do
      if ((c == want)); then
        echo "$c"
        return
      fi
    done
  done
  if ((max > 0)); then echo "$max"; else echo "$srun_rc"; fi
}

ltscale_latest_checkpoint() {  # ltscale_latest_checkpoint N CODE: stage N's newest complete checkpoint tag, or "none"
  ltscale_ask latest-tag "$RUN_DIR" "$1" ||
    ltscale_die "$2" "cannot read stage $1's newest checkpoint (python -m ltscale.rundir, error above): not requeueing"
}

ltscale_check_progress() {  # ltscale_check_progress N TAG_BEFORE: refuse a requeue that gains nothing
  # A stop signal that arrives before this incarnation has checkpointed past where it started
  # means the next incarnation would be signalled just as early: typically the --signal lead
  # (B:USR1@N, default 600 s) is not shorter than --time. Requeueing would loop forever.
  local after
  after=$(ltscale_latest_checkpoint "$1" "$LTSCALE_EXIT_STOPPED") || exit
  if [ "$after" = "$2" ]; then
    ltscale_die "$LTSCALE_EXIT_STOPPED" "stopped by SIGUSR1 before this job got past its last checkpoint ($2): not requeueing, the next start would be signalled as early. Is the --signal lead (#SBATCH --signal=B:USR1@<seconds>) shorter than --time? Resubmit with a longer --time or a shorter lead"
  fi
}

ltscale_requeue() {  # ltscale_requeue CODE: requeue this job, or exit CODE saying why not
  local code=$1 restarts=${SLURM_RESTART_COUNT:-0} max=${LTSCALE_MAX_RESTARTS:-20}
  if [ "$restarts" -ge "$max" ]; then
    ltscale_die "$code" "this job was already restarted $restarts times (LTSCALE_MAX_RESTARTS=$max): not requeueing again; resubmit to continue from the checkpoint"
  fi
  ltscale_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $max); it resumes from the last checkpoint"
  local out
  if ! out=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then
    ltscale_die "$code" "scontrol requeue $SLURM_JOB_ID failed: $out (was the job submitted with --requeue, and is JobRequeue allowed?); resubmit to continue from the checkpoint"
  fi
  exit 0  # the job is PENDING again; Slurm ends this incarnation
}

ltscale_requeue_lost_rank() {  # ltscale_requeue_lost_rank N: after exit 4, requeue once per checkpoint
  # A rank that died, hung or became unreachable (node trouble, a network blip, a collective
  # timeout) costs at most the steps since the last checkpoint, so the job requeues. A loss that
  # comes back before the job got past that checkpoint is not transient (an OOM, a rank that
  # always hangs): then it fails instead of looping up to LTSCALE_MAX_RESTARTS times.
  local tag seen=$RUN_DIR/logs/exit-codes/$SLURM_JOB_ID.lost-at
  tag=$(ltscale_latest_checkpoint "$1" "$LTSCALE_EXIT_LOST_RANK") || exit
  if grep -qxF "$tag" "$seen" 2>/dev/null; then
    ltscale_die "$LTSCALE_EXIT_LOST_RANK" "a rank was lost again before this job got past checkpoint $tag: not requeueing (a loss that recurs is not transient); see the ranks' errors above, fix the cause, then resubmit to resume from $tag"
  fi
  echo "$tag" >>"$seen"
  ltscale_log "a rank was lost (exit 4: a peer died, hung or became unreachable); the run is resumable from checkpoint $tag"
  ltscale_requeue "$LTSCALE_EXIT_LOST_RANK"
}

ltscale_end_job() {  # ltscale_end_job N RC TAG_BEFORE: complete, requeue or fail after stage N's step ended with RC
  local stage=$1 rc=$2 marker
  if [ "$rc" -eq 0 ]; then
    # The deepspeed runner reports 0 when launch.py dies from a signal, so trust the marker only.
    marker=$(ltscale_ask complete-file "$RUN_DIR" "$stage") || exit 1
    ltscale_ask stage-complete "$RUN_DIR" "$stage" ||
      ltscale_die 1 "the launcher exited 0 but $marker was not written; see the rank output above"
    ltscale_log "stage $stage complete: $marker"
    exit 0
  fi
  if [ "$rc" -eq "$LTSCALE_EXIT_STOPPED" ] && [ "${LTSCALE_STOP:-}" != TERM ]; then
    ltscale_check_progress "$stage" "$3"
    ltscale_log "checkpoint written"
    ltscale_requeue "$LTSCALE_EXIT_STOPPED"
  fi
  if [ "${LTSCALE_STOP:-}" = TERM ]; then
    # Slurm sent the TERM because it is ending this incarnation. If it is requeueing the job
    # (preemption, `scontrol requeue`), its restart counter is already ahead of ours.
    local restarts
    restarts=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Restarts=[0-9]*' | cut -d= -f2 || true)
    if [ -n "$restarts" ] && [ "$restarts" -gt "${SLURM_RESTART_COUNT:-0}" ]; then
      ltscale_log "stopped by SIGTERM: Slurm is requeueing job $SLURM_JOB_ID (preemption or scontrol requeue); the restart resumes from the last checkpoint"
      exit "$rc"
    fi
    ltscale_die "$rc" "stopped by SIGTERM (scancel, time limit or node failure): resubmit this stage to resume from the last checkpoint"
  fi
  [ "$rc" -eq "$LTSCALE_EXIT_LOST_RANK" ] && ltscale_requeue_lost_rank "$stage"
  ltscale_die "$rc" "stage $stage failed (exit code $rc); not requeueing"
}
