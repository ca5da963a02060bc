"""A real Slurm cluster for tests/slurm: ``slurm/local-cluster.sh`` with 2 simulated nodes.

The session fixture ``slurm`` starts the cluster (or reuses one that is already up with >= 2
nodes, and then leaves it running) and always stops what it started, also when a test or the
start itself fails. Without Slurm (``sbatch`` missing) or without root the tier skips with the
reason, except under ``CI=true`` (``.ci/run``), where that is a failure: CI installs Slurm
(``tests.helpers.skip_or_fail``).

``slurm`` is a :class:`Slurm` helper: ``sbatch``, ``pipeline``, job state via ``scontrol show
job`` (the local cluster has no accounting, so no ``sacct``; finished jobs stay visible for
``MinJobAge=3600`` s), waiting for a job to end, and the environment every job gets (CPU,
gloo, ``LTSCALE_MASTER_ADDR=127.0.0.1`` because the node names do not resolve, one rank per node).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.helpers import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "slurm" / "local-cluster.sh"
SLURM_DIR = Path(os.environ.get("LTSCALE_SLURM_DIR", "/tmp/ltscale-slurm"))
NODES = 2

# Job states after which a job never runs again (REQUEUED/PENDING/RUNNING/COMPLETING are not here).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}  # fmt: skip
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_FIELD = re.compile(r"(\w+)=(\S*)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slurm: runs jobs on a real local Slurm cluster (slurm/local-cluster.sh, root)"
    )


class Slurm:
    """Thin helpers around the Slurm commands, all pointed at the local cluster's slurm.conf."""

    def __init__(self, conf: Path):
        self.conf = conf

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for sbatch (which exports it to the job): CPU ranks, gloo, the local cluster."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in _DIST_ENV and not k.startswith(("SLURM_", "LTSCALE_"))
        }
        env.update(
            SLURM_CONF=str(self.conf),
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore::FutureWarning",
            LTSCALE_PYTHON=sys.executable,
            LTSCALE_MASTER_ADDR="127.0.0.1",
            LTSCALE_NPROC_PER_NODE="1",
        )
        env.update(extra)
        return env

    def run(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
            check: bool = True) -> subprocess.CompletedProcess:  # fmt: skip
        out = subprocess.run(list(map(str, cmd)), env=dict(env) if env is not None else self.env(), cwd=cwd,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} -> {out.returncode}\n{out.stdout}\n{out.stderr}")
        return out

    def sbatch(self, script: str, *script_args: str, sbatch_args: Sequence[str] = (), env: Mapping[str, str],
               cwd: Path) -> str:  # fmt: skip
        out = self.run(
            ["sbatch", "--parsable", *sbatch_args, REPO / "slurm" / script, *script_args], env=env, cwd=cwd
        )
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` fields (JobState, ExitCode, Restarts, RunTime, StdOut, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id])
        return dict(_FIELD.findall(out.stdout.splitlines()[0]))

    def wait(self, job_id: str, timeout: float = 300, log: Path | None = None) -> dict[str, str]:
        """Poll until the job reaches a final state; on timeout fail with its state and log tail."""
        deadline = time.monotonic() + timeout
        info = self.job(job_id)
        while info.get("JobState") not in FINAL_STATES:
            if time.monotonic() > deadline:
                self.run(["scancel", job_id], check=False)
                pytest.fail(
                    f"job {job_id} not finished after {timeout}s: {info}\n{tail(log or info.get('StdOut'))}"
                )
            time.sleep(1)
            info = self.job(job_id)
        return info


def tail(path: str | Path | None, n: int = 60) -> str:
    if not path or not Path(path).is_file():
        return f"(no log at {path})"
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


def _cluster(cmd: str, env: Mapping[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER), cmd], env=dict(env), capture_output=True, text=True, timeout=180
    )


def _usable(conf: Path, env: Mapping[str, str]) -> bool:
    """A cluster from this dir already answers with >= NODES idle nodes."""
    if not conf.is_file():
        return False
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env={**env, "SLURM_CONF": str(conf)},
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    states = [line.split()[1] for line in out.stdout.splitlines() if len(line.split()) == 2]
    return out.returncode == 0 and sum(s in ("idle", "mixed", "allocated") for s in states) >= NODES


@pytest.fixture(scope="session")
def slurm() -> Iterator[Slurm]:
    missing = [c for c in ("sbatch", "slurmctld", "slurmd", "munged") if shutil.which(c) is None
               and not Path("/usr/sbin", c).exists()]  # fmt: skip
    reason = None
    if missing:
        reason = f"Slurm is not installed ({', '.join(missing)} missing); .ci/run installs slurmctld/slurmd/slurm-client/munge"
    elif os.geteuid() != 0:
        reason = "the local Slurm cluster (slurm/local-cluster.sh) needs root"
    if reason:
        skip_or_fail(reason)

    env = {**os.environ, "LTSCALE_SLURM_DIR": str(SLURM_DIR), "LTSCALE_SLURM_NODES": str(NODES),
           "LTSCALE_SLURM_ETC": "0", "LTSCALE_SLURM_INSTALL": "0"}  # fmt: skip
    conf = SLURM_DIR / "slurm.conf"
    if _usable(conf, env):  # someone's cluster from the same dir: use it, leave it running
        yield Slurm(conf)
        return
    try:
        out = _cluster("start", env)
        if out.returncode != 0:
            pytest.fail(
                f"slurm/local-cluster.sh start failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
            )
        yield Slurm(conf)
    finally:
        # Also after a failed start: stop cleans up whatever came up.
        out = _cluster("stop", env)
        if out.returncode != 0:
            print(
                f"slurm/local-cluster.sh stop failed ({out.returncode}):\n{out.stdout}\n{out.stderr}",
                file=sys.stderr,
            )
