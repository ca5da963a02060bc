#!/usr/bin/env bash
# slurm/pipeline.sh [sbatch option ...] [-- key=value ...] -- submit the LT-Tuning curriculum as
# three chained Slurm jobs (stage1 -> stage2 -> stage3, each starting only if the previous one
# ended with exit 0) and print their job ids.
#
#   export LTSCALE_RUN_DIR=/shared/runs/exp1 LTSCALE_CONFIG=configs/tiny.yaml
#   slurm/pipeline.sh -N 2 --gpus-per-node=8 -p gpu -- train.micro_batch_size=4
#
# stdout: one "stage<N> <jobid>" line per submitted stage (for scripts); progress goes to stderr.
#
# Options before `--` go to every sbatch call (they override the stage scripts' #SBATCH
# defaults); key=value overrides after `--` go to every stage (after LTSCALE_ARGS).
# Environment: everything slurm/common.sh documents (LTSCALE_RUN_DIR and LTSCALE_CONFIG are
# required and checked here, before anything is submitted), plus
#   LTSCALE_STAGES   stages to submit, in order (default "1 2 3"; "2 3" continues a run whose
#                    stage 1 is done)
#   LTSCALE_SEEDS    "1 2 3": every stage becomes a job array, task i trains seed S_i in
#                    RUN_DIR/seed<S_i> with train.seed=S_i; stage N+1's task i waits for stage
#                    N's task i only (--dependency=aftercorr), so seeds progress independently.
#
# Logs: --output=RUN_DIR/logs/%x-%j.out (%x-%A_%a.out for arrays) with --open-mode=append, so a
# requeued job keeps appending to one file. A stage that fails cancels the stages after it
# (--kill-on-invalid-dep=yes) instead of leaving them pending forever.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
  echo "pipeline: error: $*" >&2
  exit 2
}

sbatch_args=()
overrides=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then
    shift
    overrides=("$@")
    break
  fi
  sbatch_args+=("$1")
  shift
done

[ -n "${LTSCALE_RUN_DIR:-}" ] || die "LTSCALE_RUN_DIR is not set (a run directory on storage every node sees)"
[ -n "${LTSCALE_CONFIG:-}" ] || die "LTSCALE_CONFIG is not set (e.g. configs/tiny.yaml)"
command -v sbatch >/dev/null || die "sbatch not found: is this a Slurm login node? (try slurm/local-cluster.sh start)"

# Absolute paths, so the jobs do not depend on where they are started. A relative config is
# looked up here first, then in the repo (configs/...), like the stage scripts do.
case "$LTSCALE_CONFIG" in
  /*) config=$LTSCALE_CONFIG ;;
  *) if [ -f "$PWD/$LTSCALE_CONFIG" ]; then config=$PWD/$LTSCALE_CONFIG; else config=$REPO/$LTSCALE_CONFIG; fi ;;
esac
[ -f "$config" ] || die "LTSCALE_CONFIG=$LTSCALE_CONFIG: no such file (looked in $PWD and $REPO)"
case "$LTSCALE_RUN_DIR" in
  /*) run_dir=$LTSCALE_RUN_DIR ;;
  *) run_dir=$PWD/$LTSCALE_RUN_DIR ;;
esac
mkdir -p "$run_dir/logs" || die "cannot create $run_dir/logs"
export LTSCALE_REPO=$REPO LTSCALE_CONFIG=$config LTSCALE_RUN_DIR=$run_dir

read -r -a stages <<<"${LTSCALE_STAGES:-1 2 3}"
for s in "${stages[@]}"; do
  [ -f "$REPO/slurm/stage$s.sh" ] || die "LTSCALE_STAGES: no slurm/stage$s.sh"
done
[ ${#stages[@]} -gt 0 ] || die "LTSCALE_STAGES is empty"

seeds=()
[ -n "${LTSCALE_SEEDS:-}" ] && read -r -a seeds <<<"$LTSCALE_SEEDS"
array=()
dep_kind=afterok
output=$run_dir/logs/%x-%j.out
if [ ${#seeds[@]} -gt 0 ]; then
  for s in "${seeds[@]}"; do [[ $s =~ ^[0-9]+$ ]] || die "LTSCALE_SEEDS: '$s' is not a non-negative integer"; done
  array=(--array=0-$((${#seeds[@]} - 1)))
  dep_kind=aftercorr
  output=$run_dir/logs/%x-%A_%a.out
fi

submitted=()
cancel_submitted() {  # a half-submitted chain would run stages nobody asked for
  if [ ${#submitted[@]} -gt 0 ]; then
    echo "pipeline: cancelling already submitted jobs ${submitted[*]}" >&2
    scancel "${submitted[@]}" || true
  fi
}

prev=
for s in "${stages[@]}"; do
  dep=()
  [ -n "$prev" ] && dep=("--dependency=$dep_kind:$prev" --kill-on-invalid-dep=yes)
  if ! out=$(sbatch --parsable --output="$output" --open-mode=append \
    "${array[@]+"${array[@]}"}" "${dep[@]+"${dep[@]}"}" "${sbatch_args[@]+"${sbatch_args[@]}"}" \
    "$REPO/slurm/stage$s.sh" "${overrides[@]+"${overrides[@]}"}" 2>&1); then
    echo "pipeline: sbatch for stage $s failed: $out" >&2
    cancel_submitted
    exit 1
  fi
  id=$(tail -n 1 <<<"$out")
  id=${id%%;*}  # --parsable prints "jobid[;cluster]"
  [[ $id =~ ^[0-9]+$ ]] || {
    echo "pipeline: unexpected sbatch output for stage $s: $out" >&2
    cancel_submitted
    exit 1
  }
  submitted+=("$id")
  echo "stage$s $id"
  echo "pipeline: stage $s -> job $id${prev:+ ($dep_kind:$prev)}${seeds[0]+, seeds ${seeds[*]}}" >&2
  prev=$id
done
echo "pipeline: run dir $run_dir; logs in $run_dir/logs; watch with: squeue -j $(IFS=,; echo "${submitted[*]}")" >&2
