"""ZeRO-3 engine on 2 CPU ranks (gloo): DP equivalence, exact resume, external parameters.

Three launches of tests/dist/engine_worker.py share the work (a launch is mostly imports):
  A  torchrun, 2 ranks: 4 steps (micro 2), checkpoints after steps 1, 2, 3 (keep_last_n=2),
     external-parameter toy check
  B  plain python, 1 rank: same global batch as micro 2 x accum 2; a full load of A's checkpoint
     must fail with a world-size error; a weights-only load of A's step2 (not the latest) works
  C  torchrun, 2 ranks: fresh process loads A's step2 (explicit tag, not latest), runs steps 3-4
(tmp paths contain no spaces, so the command strings are split on whitespace).
Every launch runs under a timeout and in its own process group, so a hang fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import communicate_group, free_port, launch_env, popen_group, skip_or_fail, torchrun_cmd
from tests.unit.test_launch_env import DS_UNDER_SRUN_PMI2_3, STEP_PMI2_3, _rec

pytestmark = pytest.mark.dist

WORKER = Path(__file__).with_name("engine_worker.py")
REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 150


def _env() -> dict[str, str]:
    return launch_env(
        REPO,
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/ds_ext"),
        PYTHONWARNINGS="ignore::FutureWarning,ignore::DeprecationWarning",
    )


def _run(cmd: list[str], env: dict[str, str]) -> None:
    """Run in a new session; on timeout kill the whole group (torchrun and its ranks)."""
    proc = popen_group(cmd, env=env, cwd=REPO, merge_stderr=True)
    out, _, timed_out = communicate_group(proc, LAUNCH_TIMEOUT_S, sigterm_first=False)
    if timed_out:
        pytest.fail(f"timed out after {LAUNCH_TIMEOUT_S}s (hang?): {' '.join(cmd)}\n{out[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-6000:]}")


def _torchrun(args: list[str]) -> list[str]:
    return torchrun_cmd(WORKER, 2, free_port(), args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    ckpt = d / "ckpt"
    env = _env()
    a = f"train --out {d / 'a.json'} --micro 2 --ckpt {ckpt} --save-at 1,2,3 --toy"
    _run(_torchrun(a.split()), env)
    ckpt_after_a = sorted(p.name for p in ckpt.iterdir())
    b = f"train --out {d / 'b.json'} --micro 2 --accum 2 --expect-mismatch {ckpt} --weights-from {ckpt} --tag step2"
    _run([sys.executable, str(WORKER), *b.split()], env)
    c = f"resume --out {d / 'c.json'} --micro 2 --ckpt {ckpt} --tag step2"
    _run(_torchrun(c.split()), env)
    res = {k: json.loads((d / f"{k}.json").read_text()) for k in "abc"}
    res["sd"] = {k: d / f"{k}.pt" for k in "abc"}
    res["ckpt"] = ckpt
    res["ckpt_after_a"] = ckpt_after_a
    yield res
    shutil.rmtree(d, ignore_errors=True)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _max_rel_sd(x: dict, y: dict) -> float:
    assert sorted(x) == sorted(y)
    return max(float((x[k] - y[k]).abs().max() / y[k].abs().max().clamp_min(1e-12)) for k in x)


def test_parameters_really_sharded(runs):
    a = runs["a"]
    assert a["world"] == 2 and a["sharded"] == a["n_params"] > 0
    assert a["allreduce_sum_ranks"] == 3.0


def test_two_ranks_equal_one_rank_on_same_global_batch(runs):
    import torch

    a, b = runs["a"]["steps"], runs["b"]["steps"]
    assert runs["b"]["world"] == 1 and sorted(a) == sorted(b) == ["1", "2", "3", "4"]
    for s in a:
        loss2, gn2, lr2 = a[s]
        loss1, gn1, lr1 = b[s]
        assert _rel(loss2, loss1) <= 1e-5, (s, loss2, loss1)
        assert _rel(gn2, gn1) <= 1e-5, (s, gn2, gn1)
        assert lr2 == lr1
    sd_a, sd_b = (torch.load(runs["sd"][k], weights_only=True) for k in "ab")
    assert runs["a"]["sd_keys_match"] and runs["b"]["sd_keys_match"]
    assert _max_rel_sd(sd_a, sd_b) <= 1e-5


def test_resume_in_new_process_is_exact(runs):
    import torch

    a, c = runs["a"], runs["c"]
    assert c["resumed_state"] == {"step": 2}
    assert sorted(c["steps"]) == ["3", "4"]
    for s in ("3", "4"):
        assert c["steps"][s][2] == a["steps"][s][2]  # LR schedule position restored
        assert _rel(c["steps"][s][0], a["steps"][s][0]) <= 1e-6, (s, c["steps"][s], a["steps"][s])
        assert _rel(c["steps"][s][1], a["steps"][s][1]) <= 1e-6
    assert _max_rel_sd(*(torch.load(runs["sd"][k], weights_only=True) for k in "ca")) <= 1e-6
    # keep_last_n=2 rotated step1 away; the renamed DeepSpeed dir step2 (not latest) was loaded
    assert [n for n in runs["ckpt_after_a"] if n.startswith("step")] == ["step2", "step3"]
    assert (runs["ckpt"] / "latest").read_text() == "step3"
    assert not [n for n in runs["ckpt_after_a"] if n.startswith(".")]


def test_external_parameter_gradients_match_plain_torch(runs):
    a = runs["a"]
    assert a["toy_sharded_params"] == len(a["toy_rel_err"])
    assert max(a["toy_rel_err"].values()) <= 1e-5, a["toy_rel_err"]
    # Without register_external_parameter the fusion sees the empty ZeRO-3 placeholder.
    assert "not gathered" in a["toy_control"]


def test_world_size_mismatch_is_reported(runs):
    assert "world size 2, now 1" in runs["b"]["mismatch"]


def test_weights_only_load_of_older_tag_at_smaller_world(runs):
    """Plain DeepSpeed would consolidate `latest` (step3) here instead of the requested step2."""
    b = runs["b"]
    assert b["weights_state"] == {"step": 2}
    assert b["weights_err"] == 0.0
    assert b["weights_vs_latest"] > 0.0
    assert b["weights_lr_step"] == 0  # fresh schedule


def test_init_distributed_under_mpirun(tmp_path):
    """OMPI_COMM_WORLD_* are mapped and the rendezvous stays on loopback (no `hostname -I`)."""
    if shutil.which("mpirun") is None:  # .ci/run installs openmpi-bin
        skip_or_fail("Open MPI (mpirun) not installed")
    code = (
        "import os; from ltscale.engine import init_distributed, all_reduce_sum, all_gather_object, any_rank\n"
        "i = init_distributed(timeout_s=60)\n"
        "s = all_reduce_sum(i.rank + 1.0); g = all_gather_object(i.local_rank); f = any_rank(i.rank == 1)\n"
        f"open(r'{tmp_path}/r%d.json' % i.rank, 'w').write(__import__('json').dumps("
        "[i.rank, i.world_size, i.is_main, s, g, f, os.environ['MASTER_ADDR']]))\n"
        "from ltscale.engine import shutdown_distributed; shutdown_distributed()\n"
    )
    env = _env()
    env.update(
        MASTER_PORT=str(free_port()),
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_btl="self,tcp",
        OMPI_MCA_btl_tcp_if_include="lo",
        OMPI_MCA_oob_tcp_if_include="lo",
    )
    _run(
        [
            "mpirun",
            "-np",
            "2",
            "--oversubscribe",
            "-x",
            "MASTER_PORT",
            "-x",
            "PYTHONPATH",
            "-x",
            "DS_ACCELERATOR",
            sys.executable,
            "-c",
            code,
        ],
        env,
    )
    got = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1)]
    assert got == [
        [0, 2, True, 3.0, [0, 1], True, "127.0.0.1"],
        [1, 2, False, 3.0, [0, 1], True, "127.0.0.1"],
    ]


_LAUNCH_VARS = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMI_RANK",
    "PMI_SIZE",
    "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS",
    "SLURM_PROCID",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_LOCALID",
    "SLURM_STEP_NUM_NODES",
    "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_NODEID",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
]


@pytest.mark.parametrize(
    ("given", "how", "want"),
    [
        (
            {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1"},
            "env",
            ("3", "4", "1", "n1"),
        ),
        (
            {
                "OMPI_COMM_WORLD_RANK": "1",
                "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            },
            "openmpi",
            ("1", "2", "1", "127.0.0.1"),
        ),
        (
            {
                "SLURM_PROCID": "2",
                "SLURM_STEP_NUM_TASKS": "4",
                "SLURM_LOCALID": "2",
                "SLURM_STEP_NUM_NODES": "1",
            },
            "srun",
            ("2", "4", "2", "127.0.0.1"),
        ),
        # srun on an MpiDefault=pmi2 site: PMI_RANK/PMI_SIZE are srun's own; the local rank is srun's
        ({**_rec(STEP_PMI2_3), "MASTER_ADDR": "n1"}, "pmi", ("3", "4", "1", "n1")),
        # ltscale's Slurm jobs there: deepspeed under one srun task per node (PMI_RANK = node index)
        (_rec(DS_UNDER_SRUN_PMI2_3), "env", ("3", "4", "1", "127.0.0.1")),
        (
            {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0"},
            "single",
            ("0", "1", "0", "127.0.0.1"),
        ),
        ({}, "single", ("0", "1", "0", "127.0.0.1")),
    ],
)
def test_launcher_env_mapping(monkeypatch, given, how, want):
    from ltscale.engine import dist

    for k in _LAUNCH_VARS:
        # setenv first so monkeypatch records the variable and removes what _prepare_env sets
        monkeypatch.setenv(k, "unset")
        monkeypatch.delenv(k)
    for k, v in given.items():
        monkeypatch.setenv(k, v)
    assert dist._prepare_env() == how
    assert tuple(os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")) == want
    assert os.environ["MASTER_PORT"].isdigit()


@pytest.mark.parametrize(
    "given",
    [
        {"RANK": "0"},
        {
            "OMPI_COMM_WORLD_RANK": "0",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        },
        {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "2", "SLURM_LOCALID": "0"},
        _rec(STEP_PMI2_3),  # srun across 2 nodes, no MASTER_ADDR
        # stale torch variables inherited into an mpirun launch: every rank would claim rank 1
        {"RANK": "1", "WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"},
    ],
)
def test_launcher_env_errors(monkeypatch, given):
    """Half a torch env, or a multi-node launch with no MASTER_ADDR, fails instead of hanging."""
    from ltscale.engine import dist
    from ltscale.launch_env import LaunchEnvError

    for k in _LAUNCH_VARS:
        # setenv first so monkeypatch records the variable and removes what _prepare_env sets
        monkeypatch.setenv(k, "unset")
        monkeypatch.delenv(k)
    for k, v in given.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(LaunchEnvError, match="WORLD_SIZE|MASTER_ADDR|stale"):
        dist._prepare_env()


def test_collectives_without_process_group():
    import torch

    from ltscale.engine import dist

    assert not dist.is_initialized()
    assert dist.all_reduce_max(3) == 3 and dist.all_reduce_sum(2.5) == 2.5
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}] and dist.broadcast_object(5) == 5
    assert dist.any_rank(True) and not dist.any_rank(False)
    t = torch.tensor([1, 2])
    assert dist.all_reduce_mean_tensor(t).dtype == torch.float64
    dist.barrier()
    assert dist.dist_info() == dist.DistInfo(rank=0, world_size=1, local_rank=0, is_main=True)
