#!/bin/bash
# slurm/stage2.sh -- LT-Tuning stage 2: latent <thinking> tokens from hidden states (mode hidden),
# its confidence scoring inside the job; one checkpointed, requeueable Slurm job.
#
#   export LTSCALE_RUN_DIR=/shared/runs/exp1 LTSCALE_CONFIG=configs/tiny.yaml
#   sbatch [-N 4] [--gpus-per-node=4] [-p PART] [-t 12:00:00] slurm/stage2.sh [key=value ...]
#
# The three stage scripts differ only in the stage number and the job name; the job itself
# (inputs, stage order, signals, requeue, logs) is slurm/common.sh, and README.md, section "Slurm",
# tells the whole story. The #SBATCH defaults stay here because sbatch reads them from the file it
# is given; any of them can be overridden on the sbatch command line.
#
#SBATCH --job-name=ltscale-stage2
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

# Slurm runs a spool copy of this file, so its own path does not lead to the checkout; scontrol
# knows the path that was submitted. exec keeps the batch shell's pid, which --signal=B: targets.
for _repo in "${LTSCALE_REPO:-}" "$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null |
  sed -n 's|^ *Command=\(.*\)/slurm/[^/]*$|\1|p')" "${SLURM_SUBMIT_DIR:-.}" "$(dirname "$0")/.."; do
  [ -f "$_repo/slurm/common.sh" ] && exec bash "$_repo/slurm/common.sh" stage 2 "$@"
done
echo "ERROR: cannot find the ltscale checkout (slurm/common.sh); set LTSCALE_REPO" >&2
exit 2
