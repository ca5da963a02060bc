#!/bin/bash
# slurm/stage3.sh -- LT-Tuning stage 3: Context-Prediction Fusion (mode fusion); its confidence scoring runs inside the job,
# as one checkpointed, requeueable Slurm job.
#
#   export LTSCALE_RUN_DIR=/shared/runs/exp1 LTSCALE_CONFIG=configs/tiny.yaml
#   sbatch [-N 4] [--gpus-per-node=4] [-p PART] [-t 12:00:00] slurm/stage3.sh [key=value ...]
#
# Any #SBATCH default below can be overridden on the sbatch command line. slurm/pipeline.sh
# submits all three stages chained with afterok; see README.md, section "Slurm", for the whole story.
#
# Inputs (environment; sbatch passes the submitting shell's environment to the job):
#   LTSCALE_RUN_DIR         required. Run directory, on storage that every node sees (checkpoints,
#                           TensorBoard, logs/). Wins over any run_dir in the config.
#   LTSCALE_CONFIG          required. Run config YAML; a relative path is looked up in the submit
#                           dir, then in the repo (configs/tiny.yaml).
#   LTSCALE_ARGS            extra key=value overrides (whitespace-separated); arguments given to
#                           this script are appended after them.
#   LTSCALE_NPROC_PER_NODE  ranks per node; default = GPUs per node. Required on a CPU partition
#                           (with --gpus-per-node=0 and DS_ACCELERATOR=cpu).
#   LTSCALE_LAUNCHER        deepspeed (default: deepspeed --no_ssh per node) or torchrun.
#   LTSCALE_MASTER_ADDR     rendezvous host (default: first node of the job; 127.0.0.1 on
#                           slurm/local-cluster.sh, whose node names do not resolve).
#   LTSCALE_MASTER_PORT     rendezvous port (default: 29500 + job id % 1000, stable across requeues).
#   LTSCALE_PYTHON          interpreter (default: REPO/.venv/bin/python, else python3 on PATH).
#   LTSCALE_MAX_RESTARTS    self-requeues allowed per job (default 20), a guard against loops.
#   LTSCALE_SEEDS           "1 2 3" with --array=0-2: array task i trains seed i in RUN_DIR/seed<S>.
#   LTSCALE_SRUN_ARGS       extra srun options for the training step (site-specific binding etc.).
#   LTSCALE_RESIGNAL_S      re-send a stop signal every N s until the ranks react (default 30).
#   LTSCALE_REPO            the ltscale checkout (default: found from the submitted script's path).
#
# Stage order: exits 2 at once, naming RUN_DIR/stage2/COMPLETE, if stage 2 has not finished
# (stage 1 has no predecessor); exits 0 with "already complete" if RUN_DIR/stage3/COMPLETE exists.
#
# Time limit and preemption: --signal=B:USR1@600 asks for SIGUSR1 600 s before the time limit
# (Slurm delivers it up to ~60 s early: its timer ticks every 30 s). The lead must cover the
# current step plus a full checkpoint save plus that jitter; raise it for large models on slow
# storage (an 8B ZeRO-3 save is minutes). On SIGUSR1 every rank stops at the next step boundary,
# saves, exits 143, and the job requeues itself and resumes exactly (unless the signal came before
# it got past its last checkpoint: then the lead is too long for --time and it fails instead of
# looping). On SIGTERM (preemption with
# PreemptMode=REQUEUE, scancel) the ranks also checkpoint, within KillWait (and the launcher's
# 30 s grace); Slurm then requeues a preempted job itself.
#
# Logs: everything goes to Slurm's output file and to RUN_DIR/logs/<job name>-<job id>.out
# (--open-mode=append keeps one file across requeues).
#
#SBATCH --job-name=ltscale-stage3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#
# --ntasks-per-node=1 is not a tuning knob: one task per node runs the launcher, which starts one
# rank per GPU (LTSCALE_NPROC_PER_NODE).
set -euo pipefail

# Slurm runs a copy of this script from its spool dir, so its own path does not lead to the repo;
# scontrol knows the path that was submitted.
if [ -z "${LTSCALE_REPO:-}" ]; then
  _submitted=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=//p' | head -n 1 || true)
  for _dir in "$(dirname "${_submitted:-.}")/.." "${SLURM_SUBMIT_DIR:-.}" "$(dirname "${BASH_SOURCE[0]}")/.."; do
    if [ -f "$_dir/slurm/common.sh" ] && [ -f "$_dir/ltscale/train.py" ]; then
      LTSCALE_REPO=$(cd "$_dir" && pwd)
      break
    fi
  done
fi
if [ -z "${LTSCALE_REPO:-}" ]; then
  echo "ERROR: cannot find the ltscale checkout (slurm/common.sh); set LTSCALE_REPO" >&2
  exit 2
fi
# shellcheck source=slurm/common.sh
source "$LTSCALE_REPO/slurm/common.sh"
ltscale_stage_main 3 "$@"
