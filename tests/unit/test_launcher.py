"""launcher: Slurm hostlists, context parsing and launch commands on recorded Slurm environments.

Pure functions only (no torch/deepspeed import), plus one subprocess run of ``python -m launcher``.
The recorded environments below are what sbatch/srun export on real clusters, trimmed to the
variables the launcher reads plus a few it must ignore.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import parse_gpu_count, parse_tasks_per_node
from launcher.__main__ import main
from launcher.commands import (
    deepspeed_command,
    hostfile,
    rendezvous_env,
    torchrun_command,
    visible_devices_warning,
)
from launcher.slurm import SlurmContext, expand_nodelist, master_addr, master_port, slurm_context
from tests.helpers import skip_or_fail

REPO = Path(__file__).resolve().parents[2]


def _rec(text: str) -> dict[str, str]:
    """A recorded environment written as `KEY=VALUE` words (values here contain no spaces)."""
    return dict(word.split("=", 1) for word in text.split())


# sbatch -N1 -n1 --gpus-per-node=1: the batch step of a one-task job.
ENV_1x1 = _rec("""
    SLURM_JOB_ID=4242 SLURM_JOB_NAME=stage1 SLURM_JOB_NODELIST=node17 SLURM_NODELIST=node17
    SLURM_JOB_NUM_NODES=1 SLURM_NNODES=1 SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1
    SLURM_TASKS_PER_NODE=1 SLURM_GPUS_ON_NODE=1 SLURM_GPUS_PER_NODE=1 SLURM_CPUS_PER_TASK=8
    SLURMD_NODENAME=node17 CUDA_VISIBLE_DEVICES=0
""")

# srun --ntasks-per-node=1 inside sbatch -N4 --gpus-per-node=8: the task on the third node.
ENV_4x8_NODE2 = _rec("""
    SLURM_JOB_ID=81234 SLURM_JOB_NODELIST=gpu[01-04] SLURM_JOB_NUM_NODES=4 SLURM_NODEID=2
    SLURM_PROCID=2 SLURM_LOCALID=0 SLURM_NTASKS=4 SLURM_TASKS_PER_NODE=1(x4) SLURM_STEP_TASKS_PER_NODE=1(x4)
    SLURM_GPUS_ON_NODE=8 SLURM_GPUS_PER_NODE=gpu:8 SLURM_CPUS_PER_TASK=64 SLURMD_NODENAME=gpu03
    CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7
""")

# sbatch -n7 on a bracketed, zero-padded, non-contiguous allocation: tasks 2,2,2,1 (SLURM_TASKS_PER_NODE
# is the real layout; there is no SLURM_NTASKS_PER_NODE without --ntasks-per-node). Task 6 on gpu04.
ENV_UNEVEN = _rec("""
    SLURM_JOB_ID=990017 SLURM_JOB_NODELIST=gpu[01-02,04],gpu07 SLURM_NNODES=4 SLURM_NODEID=2
    SLURM_PROCID=6 SLURM_LOCALID=0 SLURM_NTASKS=7 SLURM_TASKS_PER_NODE=2(x3),1
    SLURM_GPUS_PER_NODE=gpu:a100:4 SLURMD_NODENAME=gpu04
""")


def _env(base: dict[str, str], **changes: str | None) -> dict[str, str]:
    """``base`` with some variables changed; None removes one."""
    return {k: v for k, v in {**base, **changes}.items() if v is not None}


# a CPU-only allocation (the local CI cluster): no GPU variable at all
ENV_NO_GPU = {k: v for k, v in ENV_4x8_NODE2.items() if "GPU" not in k and k != "CUDA_VISIBLE_DEVICES"}


# --------------------------------------------------------------------------- expand_nodelist


@pytest.mark.parametrize(
    ("spec", "hosts"),
    [
        ("gpu01", ["gpu01"]), ("n[7]", ["n7"]),
        ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("node[001-003]-ib", ["node001-ib", "node002-ib", "node003-ib"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("n[8-10]", ["n8", "n9", "n10"]), ("n[08-10]", ["n08", "n09", "n10"]),  # width of the lower bound
        ("gpu[01-02,05],cpu[1-2],login", ["gpu01", "gpu02", "gpu05", "cpu1", "cpu2", "login"]),
        ("a[1-2] b1", ["a1", "a2", "b1"]),  # whitespace separates too, as in Slurm
        ("x1.cluster.local,x-2_b", ["x1.cluster.local", "x-2_b"]),
        (" n1,,n2 ", ["n1", "n2"]),  # empty items are skipped, as Slurm does
    ],
)  # fmt: skip
def test_expand_nodelist(spec: str, hosts: list[str]) -> None:
    assert expand_nodelist(spec) == hosts


@pytest.mark.parametrize(
    ("spec", "pos"),
    [
        ("gpu[01-04", 3), ("gpu01]", 5), ("gpu[[1]]", 4),  # unclosed, unmatched, nested brackets
        ("gpu[]", 4), ("gpu[1-]", 4), ("gpu[-1]", 4), ("gpu[3-1]", 4), ("gpu[a-b]", 4), ("gpu[1-2-3]", 4),
        ("gpu[1,,2]", 6),
        ("gpu[1-2],b$x", 10),  # an unexpanded shell variable
        ("a[0-99999999]", 2),  # absurd size
    ],
)  # fmt: skip
def test_expand_nodelist_malformed_names_spec_and_position(spec: str, pos: int) -> None:
    with pytest.raises(ValueError) as err:
        expand_nodelist(spec)
    assert repr(spec) in str(err.value)
    assert f"at position {pos}" in str(err.value)


@pytest.mark.parametrize("spec", ["", "  ", ","])
def test_expand_nodelist_empty(spec: str) -> None:
    with pytest.raises(ValueError, match="no host names"):
        expand_nodelist(spec)


# --------------------------------------------------------------------------- small parsers


def test_parse_tasks_per_node() -> None:
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("8") == [8]
    assert parse_tasks_per_node("4(x2),2(x2)") == [4, 4, 2, 2]
    for bad in ("2(x0)", "2x3", "", "a"):
        with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE"):
            parse_tasks_per_node(bad)


@pytest.mark.parametrize(
    ("spec", "n"),
    [("4", 4), ("gpu:4", 4), ("a100:8", 8), ("gpu:a100:4", 4), ("gpu:4(IDX:0-3)", 4), ("a100:2,v100:1", 3)],
)
def test_parse_gpu_count(spec: str, n: int) -> None:
    assert parse_gpu_count(spec) == n


@pytest.mark.parametrize("spec", ["gpu:a100", "gpu::4", "four", "gpu:-1"])
def test_parse_gpu_count_malformed(spec: str) -> None:
    with pytest.raises(ValueError, match="SLURM_GPUS_PER_NODE"):
        parse_gpu_count(spec)


# --------------------------------------------------------------------------- slurm_context


def test_context_one_node_one_task() -> None:
    ctx = slurm_context(ENV_1x1)
    assert ctx == SlurmContext("4242", ("node17",), 0, 1, (1,), 1, cpus_per_task=8)
    assert master_addr(ctx) == "node17"
    assert hostfile(ctx) == "node17 slots=1\n"
    assert rendezvous_env(ctx) == {"MASTER_ADDR": "node17", "MASTER_PORT": "29742"}


def test_context_four_nodes_eight_gpus_node2() -> None:
    ctx = slurm_context(ENV_4x8_NODE2)
    assert ctx.nodes == ("gpu01", "gpu02", "gpu03", "gpu04")
    assert (ctx.node_rank, ctx.num_nodes, ctx.gpus_per_node, ctx.hostname) == (2, 4, 8, "gpu03")
    assert ctx.tasks_per_node == (1, 1, 1, 1)
    assert hostfile(ctx) == "gpu01 slots=8\ngpu02 slots=8\ngpu03 slots=8\ngpu04 slots=8\n"
    port = str(master_port(81234))
    assert deepspeed_command(ctx, "ltscale/train.py", ["--config", "c.yaml"], hostfile_path="/run/h") == [
        "deepspeed", "--hostfile", "/run/h", "--no_ssh", "--node_rank", "2", "--master_addr", "gpu01",
        "--master_port", port, "--num_nodes", "4", "--num_gpus", "8", "ltscale/train.py", "--config", "c.yaml",
    ]  # fmt: skip
    assert torchrun_command(ctx, "ltscale/train.py", ["--stage", "1"]) == [
        "torchrun", "--nnodes", "4", "--node_rank", "2", "--nproc_per_node", "8", "--master_addr", "gpu01",
        "--master_port", port, "ltscale/train.py", "--stage", "1",
    ]  # fmt: skip
    assert torchrun_command(ctx, "t.py", [], rendezvous="c10d") == [
        "torchrun", "--nnodes", "4", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", f"gpu01:{port}", "--rdzv_id", "81234", "t.py",
    ]  # fmt: skip


def test_context_uneven_tasks_and_padded_list() -> None:
    ctx = slurm_context(ENV_UNEVEN)
    assert ctx.nodes == ("gpu01", "gpu02", "gpu04", "gpu07")
    assert ctx.tasks_per_node == (2, 2, 2, 1)
    assert (ctx.num_tasks, ctx.local_tasks, ctx.gpus_per_node) == (7, 2, 4)
    assert rendezvous_env(ctx) == {"MASTER_ADDR": "gpu01", "MASTER_PORT": "29517"}
    last = slurm_context(_env(ENV_UNEVEN, SLURM_NODEID="3", SLURM_PROCID="6", SLURM_LOCALID="0"))
    assert last.local_tasks == 1


def test_context_step_layout_wins_and_ntasks_per_node_fallback() -> None:
    # inside `srun --ntasks-per-node=1` of a job submitted with 8 tasks per node
    env = _env(ENV_4x8_NODE2, SLURM_TASKS_PER_NODE="8(x4)", SLURM_STEP_TASKS_PER_NODE="1(x4)")
    assert slurm_context(env).tasks_per_node == (1, 1, 1, 1)
    bare = _env(ENV_4x8_NODE2, SLURM_TASKS_PER_NODE=None, SLURM_STEP_TASKS_PER_NODE=None)
    assert slurm_context(bare).tasks_per_node == (1, 1, 1, 1)
    assert slurm_context({**bare, "SLURM_NTASKS_PER_NODE": "8"}).tasks_per_node == (8, 8, 8, 8)


@pytest.mark.parametrize(
    ("recorded", "gpus"),
    [
        ("SLURM_GPUS_PER_NODE=gpu:a100:4", 4), ("SLURM_GPUS_PER_NODE=a100:8 CUDA_VISIBLE_DEVICES=0", 8),
        ("SLURM_GPUS_PER_NODE=4", 4), ("SLURM_GPUS_ON_NODE=2 SLURM_GPUS_PER_NODE=gpu:8", 2),  # own count wins
        ("CUDA_VISIBLE_DEVICES=4,5,6", 3), ("CUDA_VISIBLE_DEVICES=NoDevFiles", 0),
        ("CUDA_VISIBLE_DEVICES=", 0), ("", 0),
    ],
)  # fmt: skip
def test_context_gpu_sources(recorded: str, gpus: int) -> None:
    assert slurm_context({**ENV_NO_GPU, **_rec(recorded)}).gpus_per_node == gpus


def test_missing_nodelist_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="SLURM_JOB_NODELIST"):
        slurm_context(_env(ENV_4x8_NODE2, SLURM_JOB_NODELIST=None))
    with pytest.raises(KeyError, match="SLURM_JOB_ID"):
        slurm_context(_env(ENV_4x8_NODE2, SLURM_JOB_ID=None))


@pytest.mark.parametrize(
    ("changes", "var"),
    [
        ({"SLURM_JOB_NODELIST": "gpu[01-04"}, "SLURM_JOB_NODELIST"),
        ({"SLURM_JOB_NODELIST": "gpu[01-02],gpu02"}, "SLURM_JOB_NODELIST"),  # duplicate host
        ({"SLURM_JOB_NUM_NODES": "8"}, "SLURM_JOB_NUM_NODES"),
        ({"SLURM_NODEID": "two"}, "SLURM_NODEID"), ({"SLURM_NODEID": "4"}, "SLURM_NODEID"),
        ({"SLURM_RESTART_COUNT": "once"}, "SLURM_RESTART_COUNT"),
        ({"SLURM_CPUS_PER_TASK": "0"}, "SLURM_CPUS_PER_TASK"), ({"SLURM_GPUS_ON_NODE": "x"}, "SLURM_GPUS_ON_NODE"),
        ({"SLURM_GPUS_ON_NODE": None, "SLURM_GPUS_PER_NODE": "gpu:a100"}, "SLURM_GPUS_PER_NODE"),
        ({"SLURM_STEP_TASKS_PER_NODE": "1(x2)"}, "SLURM_STEP_TASKS_PER_NODE"),  # step on 2 of 4 nodes
    ],
)  # fmt: skip
def test_malformed_variables_are_named(changes: dict[str, str | None], var: str) -> None:
    with pytest.raises(ValueError, match=var):
        slurm_context(_env(ENV_4x8_NODE2, **changes))


def test_node_rank_fallbacks() -> None:
    # no SLURM_NODEID: position of SLURMD_NODENAME in the node list
    assert slurm_context(_env(ENV_4x8_NODE2, SLURM_NODEID=None)).node_rank == 2
    # one node: 0 is the only possibility
    assert slurm_context(_env(ENV_1x1, SLURM_NODEID=None, SLURMD_NODENAME=None)).node_rank == 0
    # several nodes and no way to tell: an error, never a silent 0 (every node would be rank 0)
    with pytest.raises(KeyError, match="SLURM_NODEID"):
        slurm_context(_env(ENV_4x8_NODE2, SLURM_NODEID=None, SLURMD_NODENAME=None))


def test_requeued_job_keeps_port_and_commands() -> None:
    first = slurm_context(ENV_4x8_NODE2)
    again = slurm_context(_env(ENV_4x8_NODE2, SLURM_RESTART_COUNT="1"))
    assert (first.restart_count, again.restart_count) == (0, 1)
    assert master_port(again.job_id) == master_port(first.job_id)
    ds = [
        deepspeed_command(c, "ltscale/train.py", ["--stage", "2"], hostfile_path="h") for c in (first, again)
    ]
    assert ds[0] == ds[1]
    assert rendezvous_env(again) == rendezvous_env(first)


def test_context_is_immutable_and_validated() -> None:
    ctx = SlurmContext("7", ["a", "b"], 1, 2, [1, 1], 0)  # lists are accepted and frozen
    assert ctx.nodes == ("a", "b") and hash(ctx) == hash(SlurmContext("7", ("a", "b"), 1, 2, (1, 1), 0))
    with pytest.raises(AttributeError):
        ctx.node_rank = 0  # type: ignore[misc]
    with pytest.raises(ValueError, match="node_rank"):
        SlurmContext("7", ("a", "b"), 2, 2, (1, 1), 0)
    with pytest.raises(ValueError, match="num_nodes"):
        SlurmContext("7", ("a", "b"), 0, 3, (1, 1, 1), 0)


# --------------------------------------------------------------------------- master port


def test_master_port_deterministic_and_per_job() -> None:
    assert master_port("81234") == master_port(81234) == 29500 + 234
    ports = {master_port(j) for j in range(5000, 6000)}
    assert len(ports) == 1000 and min(ports) == 29500 and max(ports) == 30499
    assert master_port("123+0") == master_port("123+0")  # CRC-32, same in every process
    assert 29500 <= master_port("123+0") < 30500
    assert master_port(7, base=40000, span=10) == 40007
    for kwargs in ({"span": 0}, {"base": 80}, {"base": 65000, "span": 1000}):
        with pytest.raises(ValueError):
            master_port(1, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        master_port(" ")


# --------------------------------------------------------------------------- commands


def test_cpu_allocation_needs_explicit_nproc() -> None:
    ctx = slurm_context(ENV_NO_GPU)
    with pytest.raises(ValueError, match="no GPUs"):
        hostfile(ctx)
    assert hostfile(ctx, slots=2).splitlines()[0] == "gpu01 slots=2"
    cmd = deepspeed_command(ctx, "t.py", hostfile_path="h", nproc_per_node=2)
    assert cmd[cmd.index("--num_gpus") + 1] == "2"
    with pytest.raises(ValueError, match="nproc_per_node"):
        torchrun_command(ctx, "t.py", nproc_per_node=0)


def test_deepspeed_needs_hostfile_for_several_nodes_only() -> None:
    with pytest.raises(ValueError, match="hostfile"):
        deepspeed_command(slurm_context(ENV_4x8_NODE2), "t.py")
    one = deepspeed_command(slurm_context(ENV_1x1), "t.py")
    assert "--hostfile" not in one and one[:4] == ["deepspeed", "--no_ssh", "--node_rank", "0"]


def test_python_module_form_and_overrides() -> None:
    ctx = slurm_context(ENV_4x8_NODE2)
    ds = deepspeed_command(ctx, "t.py", hostfile_path="h", python="/py", addr="127.0.0.1", port=12345)
    assert ds[:3] == ["/py", "-m", "deepspeed.launcher.runner"]
    assert ds[ds.index("--master_addr") + 1] == "127.0.0.1" and ds[ds.index("--master_port") + 1] == "12345"
    tr = torchrun_command(ctx, "t.py", python="py", rendezvous="c10d", addr="fe80::1", port=1)
    assert tr[:3] == ["py", "-m", "torch.distributed.run"] and "[fe80::1]:1" in tr
    with pytest.raises(ValueError, match="rendezvous"):
        torchrun_command(ctx, "t.py", rendezvous="etcd")


def test_visible_devices_warning() -> None:
    assert visible_devices_warning({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 4) is None
    assert visible_devices_warning({}, 4) is None
    assert "4,5,6,7" in (visible_devices_warning({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 4) or "")


def test_emitted_flags_exist_in_installed_launchers() -> None:
    """Contract with the pinned DeepSpeed/torch launchers, read as text (importing them costs seconds)."""
    ctx = slurm_context(ENV_4x8_NODE2)
    torchruns = [torchrun_command(ctx, "t.py", rendezvous=r) for r in ("static", "c10d")]
    for pkg, rel, cmds in [
        ("deepspeed", "launcher/runner.py", [deepspeed_command(ctx, "t.py", hostfile_path="h")]),
        ("torch", "distributed/run.py", torchruns),
    ]:
        spec = importlib.util.find_spec(pkg)  # locates without importing
        if spec is None or spec.origin is None:
            skip_or_fail(f"{pkg} not installed")
        known = set(re.findall(r"""["'](--[a-z_-]+)["']""", (Path(spec.origin).parent / rel).read_text()))
        emitted = {a for cmd in cmds for a in cmd[: cmd.index("t.py")] if a.startswith("--")}
        assert emitted <= known, f"{pkg} does not know {sorted(emitted - known)}"


# --------------------------------------------------------------------------- CLI


def test_cli_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hostfile"], env=ENV_4x8_NODE2) == 0
    assert capsys.readouterr().out.splitlines() == [f"gpu0{i} slots=8" for i in range(1, 5)]
    assert main(["env", "--master-port", "1234"], env=ENV_UNEVEN) == 0
    assert capsys.readouterr().out.splitlines() == ["MASTER_ADDR=gpu01", "MASTER_PORT=1234"]
    argv = ["command", "--launcher", "torchrun", "--rendezvous", "c10d", "--", "t.py", "a b"]
    assert main(argv, env=ENV_1x1) == 0
    out = shlex.split(capsys.readouterr().out)
    assert out[0] == "torchrun" and out[-2:] == ["t.py", "a b"]
    with pytest.raises(SystemExit) as exc:  # argparse usage errors: also status 2
        main(["bogus"], env=ENV_1x1)
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["env"], _env(ENV_1x1, SLURM_JOB_NODELIST=None, SLURM_NODELIST=None), "SLURM_JOB_NODELIST is not set"),
        (["command", "--hostfile", "h"], ENV_4x8_NODE2, "training script"),
        (["command", "--", "t.py"], ENV_4x8_NODE2, "needs a hostfile"),
        (["hostfile", "--", "t.py"], ENV_4x8_NODE2, "takes no script"),
        (["hostfile"], ENV_NO_GPU, "no GPUs"),
    ],
)  # fmt: skip
def test_cli_errors_exit_2(argv: list[str], env: dict[str, str], needle: str, capsys) -> None:
    assert main(argv, env=env) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and captured.out == ""


def test_python_m_launcher_command_subprocess(tmp_path: Path) -> None:
    """The way the Slurm scripts call it: a fresh interpreter, the node's env, output split by a shell."""
    hosts = tmp_path / "hosts"
    env = {**ENV_4x8_NODE2, "CUDA_VISIBLE_DEVICES": "4,5,6,7,8,9,10,11", "PATH": os.environ.get("PATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "command", "--hostfile", str(hosts), "--",
         "ltscale/train.py", "--config", "configs/tiny.yaml", "train.lr=1e-4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    args = ["--config", "configs/tiny.yaml", "train.lr=1e-4"]
    expected = deepspeed_command(
        slurm_context(ENV_4x8_NODE2), "ltscale/train.py", args, hostfile_path=str(hosts)
    )
    assert shlex.split(proc.stdout) == expected
    assert "warning: CUDA_VISIBLE_DEVICES=4,5" in proc.stderr  # Slurm's ids would be lost

    bad = subprocess.run(
        [sys.executable, "-m", "launcher", "command", "--", "t.py"],
        cwd=REPO, env={"PATH": env["PATH"]}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "SLURM_JOB_ID" in bad.stderr and bad.stdout == ""
