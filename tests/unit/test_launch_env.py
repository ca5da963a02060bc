"""ltscale.launch_env.rank_env on environments recorded from real launchers.

The recordings (trimmed to the variables that matter) come from: torchrun 2.13 and ``mpirun``
(Open MPI 4.1) on one host; Slurm 22.05 (slurm/local-cluster.sh, 2 nodes) for the batch step, an
``srun`` step with ``--mpi=none`` and with ``--mpi=pmi2`` (what ``MpiDefault=pmi2`` sites give
every step), an uneven step, and ltscale's own layout: one ``srun --mpi=pmi2`` task per node
running ``python -m launcher command`` (deepspeed or torchrun), 2 ranks per node. The MPICH case
is written from Hydra's documented variables (MPICH is not installed here).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from ltscale.launch_env import LaunchEnvError, RankEnv, parse_tasks_per_node, rank_env, rank_label


def _rec(text: str) -> dict[str, str]:
    """A recorded environment written as ``KEY=VALUE`` words."""
    return dict(word.split("=", 1) for word in text.split())


TORCHRUN_1 = """GROUP_RANK=0 GROUP_WORLD_SIZE=1 LOCAL_RANK=1 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1
    MASTER_PORT=29811 RANK=1 ROLE_RANK=1 TORCHELASTIC_RUN_ID=none WORLD_SIZE=2"""
OMPI_1 = """OMPI_COMM_WORLD_LOCAL_RANK=1 OMPI_COMM_WORLD_LOCAL_SIZE=2 OMPI_COMM_WORLD_NODE_RANK=1
    OMPI_COMM_WORLD_RANK=1 OMPI_COMM_WORLD_SIZE=2 PMIX_RANK=1"""
# sbatch -N2 --ntasks-per-node=2: the job script itself (no SLURM_STEP_*).
BATCH = """SLURMD_NODENAME=n1 SLURM_JOB_ID=1 SLURM_JOB_NODELIST=n[1-2] SLURM_JOB_NUM_NODES=2 SLURM_LOCALID=0
    SLURM_NNODES=2 SLURM_NODEID=0 SLURM_NPROCS=4 SLURM_NTASKS=4 SLURM_NTASKS_PER_NODE=2 SLURM_PROCID=0
    SLURM_TASKS_PER_NODE=2(x2)"""
# srun --mpi=none inside it: task 3, the second one on n2.
STEP_NONE_3 = """SLURMD_NODENAME=n2 SLURM_DISTRIBUTION=block SLURM_GTIDS=2,3 SLURM_JOB_ID=1 SLURM_LOCALID=1
    SLURM_NNODES=2 SLURM_NODEID=1 SLURM_NTASKS=4 SLURM_NTASKS_PER_NODE=2 SLURM_PROCID=3 SLURM_STEPID=0
    SLURM_STEP_NODELIST=n[1-2] SLURM_STEP_NUM_NODES=2 SLURM_STEP_NUM_TASKS=4 SLURM_STEP_TASKS_PER_NODE=2(x2)
    SLURM_TASKS_PER_NODE=2(x2)"""
PMI2 = "PMI_FD=13 PMI_JOBID=1.1 PMI_RANK=3 PMI_SIZE=4 SLURM_MPI_TYPE=pmi2"
STEP_PMI2_3 = STEP_NONE_3 + " " + PMI2
# srun --mpi=pmi2 --ntasks=3 on 2 nodes: tasks 2,1; task 2 alone on n2.
STEP3_PMI2_2 = """PMI_RANK=2 PMI_SIZE=3 SLURM_MPI_TYPE=pmi2 SLURM_JOB_NUM_NODES=2 SLURM_LOCALID=0 SLURM_NNODES=2
    SLURM_NODEID=1 SLURM_NTASKS=3 SLURM_NTASKS_PER_NODE=2 SLURM_PROCID=2 SLURM_STEP_NUM_NODES=2
    SLURM_STEP_NUM_TASKS=3 SLURM_STEP_TASKS_PER_NODE=2,1 SLURM_TASKS_PER_NODE=2,1"""
# ltscale's Slurm layout on a pmi2 site: srun task 1 (node n2) -> deepspeed --no_ssh -> rank 3 of 4.
DS_UNDER_SRUN_PMI2_3 = """CROSS_RANK=1 CROSS_SIZE=2 LOCAL_RANK=1 LOCAL_SIZE=2 MASTER_ADDR=127.0.0.1
    MASTER_PORT=29504 PMI_RANK=1 PMI_SIZE=2 RANK=3 SLURM_LOCALID=0 SLURM_MPI_TYPE=pmi2 SLURM_NODEID=1
    SLURM_NTASKS=2 SLURM_PROCID=1 SLURM_STEP_NUM_NODES=2 SLURM_STEP_NUM_TASKS=2
    SLURM_STEP_TASKS_PER_NODE=1(x2) WORLD_SIZE=4"""
# the same with LTSCALE_LAUNCHER=torchrun: rank 2 of 4, first rank of n2.
TORCHRUN_UNDER_SRUN_PMI2_2 = """GROUP_RANK=1 GROUP_WORLD_SIZE=2 LOCAL_RANK=0 LOCAL_WORLD_SIZE=2
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29504 PMI_RANK=1 PMI_SIZE=2 RANK=2 SLURM_LOCALID=0 SLURM_MPI_TYPE=pmi2
    SLURM_NODEID=1 SLURM_NTASKS=2 SLURM_PROCID=1 SLURM_STEP_NUM_NODES=2 SLURM_STEP_NUM_TASKS=2
    SLURM_STEP_TASKS_PER_NODE=1(x2) WORLD_SIZE=4"""
# MPICH / Intel MPI Hydra: mpiexec -n 8 -ppn 4, rank 5.
HYDRA_5 = "PMI_RANK=5 PMI_SIZE=8 MPI_LOCALRANKID=1 MPI_LOCALNRANKS=4 PMI_FD=6"


@pytest.mark.parametrize(
    ("env", "want"),
    [
        (TORCHRUN_1, RankEnv(1, 2, 1, 2, "env")),
        (OMPI_1, RankEnv(1, 2, 1, 2, "openmpi")),
        (BATCH, RankEnv(0, 1, 0, 1, "single")),
        (STEP_NONE_3, RankEnv(3, 4, 1, 2, "srun")),
        (STEP_PMI2_3, RankEnv(3, 4, 1, 2, "pmi")),  # local rank from SLURM_LOCALID, not 0
        (STEP3_PMI2_2, RankEnv(2, 3, 0, 1, "pmi")),
        (DS_UNDER_SRUN_PMI2_3, RankEnv(3, 4, 1, 2, "env")),
        (TORCHRUN_UNDER_SRUN_PMI2_2, RankEnv(2, 4, 0, 2, "env")),
        (HYDRA_5, RankEnv(5, 8, 1, 4, "pmi")),
        ("", RankEnv(0, 1, 0, 1, "single")),
        # a one-task step (srun -n1 ltscale eval ...) is a single process
        ("SLURM_PROCID=0 SLURM_STEP_NUM_TASKS=1 SLURM_LOCALID=0 SLURM_STEP_NUM_NODES=1", RankEnv(0, 1, 0, 1, "single")),
        # `python -m launcher` style RANK... in an srun step, agreeing with it; LOCAL_RANK from srun
        (STEP_NONE_3 + " RANK=3 WORLD_SIZE=4", RankEnv(3, 4, 1, 2, "env")),
        (OMPI_1 + " RANK=1 WORLD_SIZE=2", RankEnv(1, 2, 1, 2, "env")),
        # one srun task per node running a launcher (here: one node) -- any world size fits
        ("SLURM_PROCID=0 SLURM_STEP_NUM_TASKS=1 SLURM_LOCALID=0 SLURM_STEP_NUM_NODES=1 RANK=5 WORLD_SIZE=8 "
         "LOCAL_RANK=5 LOCAL_SIZE=8", RankEnv(5, 8, 5, 8, "env")),
    ],
)  # fmt: skip
def test_recorded_launch_environments(env: str, want: RankEnv) -> None:
    got = rank_env(_rec(env))
    assert got == want
    # init_distributed writes RANK/WORLD_SIZE/LOCAL_RANK back; reading again gives the same place
    place = {"RANK": got.rank, "WORLD_SIZE": got.world_size, "LOCAL_RANK": got.local_rank}
    again = rank_env({**_rec(env), **{k: str(v) for k, v in place.items()}})
    assert (again.rank, again.world_size, again.local_rank) == tuple(place.values())


def test_spans_nodes() -> None:
    assert rank_env(_rec(STEP_NONE_3)).spans_nodes is True
    assert rank_env(_rec(OMPI_1)).spans_nodes is False
    assert rank_env(_rec("RANK=1 WORLD_SIZE=2 LOCAL_RANK=1")).spans_nodes is None  # the launcher does not say


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        # stale torch variables under mpirun -np 2 on one host: both ranks would claim rank 1
        (OMPI_1.replace("RANK=1 ", "RANK=0 ") + " RANK=1 WORLD_SIZE=2 LOCAL_RANK=1", "stale variables"),
        # a one-rank RANK/WORLD_SIZE left in the submitting shell, exported by sbatch into a 4-task step
        (STEP_PMI2_3 + " RANK=0 WORLD_SIZE=1 LOCAL_RANK=0", "contradict the pmi launcher's rank 3 of 4"),
        # two tasks per node cannot be one launcher per node, whatever the world size
        (STEP_NONE_3 + " RANK=7 WORLD_SIZE=8 LOCAL_RANK=3", "contradict the srun launcher's rank 3 of 4 (2 on"),
        ("RANK=0", "but no WORLD_SIZE"),
        ("WORLD_SIZE=2", "but no RANK"),
        ("RANK=2 WORLD_SIZE=4", "no LOCAL_RANK"),
        ("RANK=4 WORLD_SIZE=4 LOCAL_RANK=0", "rank 4 is not below the world size 4"),
        ("RANK=1 WORLD_SIZE=4 LOCAL_RANK=2 LOCAL_WORLD_SIZE=2", "local rank 2 and 2 ranks on this node"),
        ("RANK=x WORLD_SIZE=2", "RANK='x' is not an integer"),
        ("RANK=0 WORLD_SIZE=0", "WORLD_SIZE='0' must be >= 1"),
        (OMPI_1.replace("OMPI_COMM_WORLD_LOCAL_RANK=1", ""), "OMPI_COMM_WORLD_LOCAL_RANK is not"),
        ("PMI_RANK=5 PMI_SIZE=8", "MPI_LOCALRANKID"),
        # mpiexec without its local variables inside a one-per-node srun step: srun's do not apply
        ("PMI_RANK=5 PMI_SIZE=8 SLURM_PROCID=0 SLURM_STEP_NUM_TASKS=1 SLURM_LOCALID=0", "MPI_LOCALRANKID"),
        ("SLURM_PROCID=1 SLURM_STEP_NUM_TASKS=2 SLURM_STEP_NUM_NODES=1", "SLURM_LOCALID is not"),
        ("SLURM_PROCID=x SLURM_STEP_NUM_TASKS=2 SLURM_LOCALID=0", "SLURM_PROCID='x'"),
        (STEP_NONE_3.replace("SLURM_STEP_TASKS_PER_NODE=2(x2)", "SLURM_STEP_TASKS_PER_NODE=2(x3)"),
         "SLURM_STEP_TASKS_PER_NODE='2(x3)' does not fit"),
        (STEP_NONE_3.replace("SLURM_STEP_TASKS_PER_NODE=2(x2)", "SLURM_STEP_TASKS_PER_NODE=2x2"),
         "SLURM_STEP_TASKS_PER_NODE='2x2': bad item"),
    ],
)  # fmt: skip
def test_bad_or_contradicting_environments_name_the_variables(env: str, needle: str) -> None:
    with pytest.raises(LaunchEnvError) as err:
        rank_env(_rec(env))
    assert needle in str(err.value)
    assert rank_label(_rec(env)) == "?"


def test_rank_label_and_default_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rank_label(_rec(DS_UNDER_SRUN_PMI2_3)) == "3"
    for k, v in _rec(STEP_NONE_3).items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert rank_env() == RankEnv(3, 4, 1, 2, "srun") and rank_label() == "3"


def test_parse_tasks_per_node() -> None:
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="SLURM_STEP_TASKS_PER_NODE='2x3'"):
        parse_tasks_per_node("2x3", var="SLURM_STEP_TASKS_PER_NODE")


def test_module_is_torch_free() -> None:
    """``python -m launcher`` (run several times per Slurm job start) imports it: no torch (seconds)."""
    code = "import sys, launcher, ltscale.logging_setup; print(sorted({'torch', 'deepspeed'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_rank_zero_only_callers_read_an_srun_steps_task(
    monkeypatch: pytest.MonkeyPatch, tmp_path, capsys
) -> None:
    """``srun python ltscale/train.py ...`` (no launcher inside the step): task 3 neither prints the
    trainer's nothing-to-do table nor misses a fault aimed at rank 3; task 0 prints the table."""
    from ltscale import faults, rundir, trainer
    from ltscale.run_config import load_config

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in _rec(STEP_NONE_3).items():
        monkeypatch.setenv(k, v)
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    for k in range(1, len(cfg.stages) + 1):
        rundir.stage_dir(tmp_path, k).mkdir()
        rundir.complete_file(tmp_path, k).write_text("{}")
        (rundir.stage_dir(tmp_path, k) / rundir.EVAL_FILE).write_text('{"n": 4, "accuracy_official": 0.5}')
    assert set(trainer.train(cfg, "all")) == {1, 2, 3} and capsys.readouterr().out == ""

    monkeypatch.setenv(faults.ENV, "nan:loss:1@3")
    faults.reset()
    assert math.isnan(faults.check("loss"))

    for k, v in (("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0"), ("SLURM_NODEID", "0")):
        monkeypatch.setenv(k, v)
    faults.reset()
    assert faults.check("loss") is None
    faults.reset()
    trainer.train(cfg, "all")
    assert "| stage" in capsys.readouterr().out
