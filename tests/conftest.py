"""Shared pytest setup for every test tier.

Process-wide environment set here (before torch/deepspeed are imported by any test module):

* ``DS_ACCELERATOR=cpu``: DeepSpeed would otherwise auto-detect, and a box with a GPU would
  silently switch the CPU suite to CUDA.  ``setdefault``: an explicit caller value wins (the GPU
  tier's device script sets its own).
* ``OMP_NUM_THREADS=1``: 2 ranks on 2 cores; more threads per rank only oversubscribe.

Deliberately NOT set globally: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT``.  A test that initialises a single-process group sets them itself (via
``monkeypatch.setenv`` and ``free_port``); leaking them would make every subprocess believe it is
part of a job.  Note that with mpi4py installed, ``deepspeed.init_distributed()`` without these
variables falls into MPI discovery, which picks a non-loopback MASTER_ADDR.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import helpers  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared benchmark data (``LTSCALE_DATA_DIR``, default ``<repo>/../shared/data``).

    Missing data skips the test on a developer machine, but fails it in CI (``CI=true``): there a
    silent skip would hide that the data tier never ran.
    """
    path = Path(os.environ.get("LTSCALE_DATA_DIR", REPO_ROOT.parent / "shared" / "data")).resolve()
    if not path.is_dir():
        helpers.skip_or_fail(f"data directory {path} not found (set LTSCALE_DATA_DIR)")
    return path


@pytest.fixture
def tiny_llama() -> Callable[..., torch.nn.Module]:
    """Factory for tiny, randomly initialised ``LlamaForCausalLM`` models.

    ``make(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=None, tie=False, attn="sdpa",
    dtype=torch.float64, seed=0)``.  Same arguments -> bit-identical weights; the global RNG of
    the calling test is left untouched (init runs under ``fork_rng``).  float64 by default so
    parity tests can use tight tolerances.  ``kv_heads=None`` means plain multi-head attention;
    pass fewer to exercise GQA.  The model is returned in training mode, as constructed.
    ``tests.helpers.make_tiny_llama`` (this factory) also takes the rarer keyword-only options.
    """
    return helpers.make_tiny_llama


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """``free_port()`` -> an unused TCP port on 127.0.0.1."""
    return helpers.free_port


class RanksFailed(AssertionError):
    """A multi-rank launch timed out or exited non-zero; the message carries its output."""

    def __init__(self, msg: str, proc: subprocess.CompletedProcess):
        super().__init__(msg)
        self.proc = proc


@pytest.fixture(scope="session")
def run_ranks(repo_root: Path, free_port: Callable[[], int]) -> Callable[..., subprocess.CompletedProcess]:
    """Launch ``script`` on ``nproc`` local ranks with torchrun (gloo, 127.0.0.1).

    ``run_ranks(script, nproc=2, args=(), timeout=300, env=None, cwd=None, check=True,
    launcher="torchrun"|"deepspeed"|"deepspeed_hostfile")`` returns
    the ``CompletedProcess`` (text stdout/stderr).  With ``check`` (default) a non-zero exit
    raises ``RanksFailed`` with the captured output; a timeout always raises, after the whole
    process group has been killed.  ``env`` entries are added to the test environment
    (``DS_ACCELERATOR=cpu``, ``OMP_NUM_THREADS=1``, FutureWarnings off, repo root on
    ``PYTHONPATH``).  The launcher is ``python -m torch.distributed.run`` (= ``torchrun``) of the
    running interpreter, so ranks always use the test's venv.

    The ranks share one stdout pipe.  Output stays block-buffered on purpose (no
    ``PYTHONUNBUFFERED``): unbuffered, ``print`` issues one write per piece and lines of different
    ranks interleave mid-line.  Scripts whose output a test parses, or that must show progress on
    a timeout, should ``print(..., flush=True)``, which emits each line in one write.
    ``RanksFailed`` is also reachable as ``run_ranks.Failed`` (tests cannot import conftest).
    """

    def run(
        script: str | os.PathLike,
        nproc: int = 2,
        args: Sequence[str] = (),
        timeout: float = 300,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        check: bool = True,
        launcher: str = "torchrun",
    ) -> subprocess.CompletedProcess:
        port = free_port()
        if launcher == "deepspeed":  # the product's own launch line (`deepspeed ltscale/train.py`)
            cmd = helpers.deepspeed_cmd(script, nproc, port, args)
        elif launcher == "deepspeed_hostfile":  # what the Slurm scripts run on each node: no ssh
            hosts = Path(tempfile.mkdtemp(prefix="ltscale-hosts-")) / "hostfile"
            hosts.write_text(f"localhost slots={nproc}\n")
            cmd = [
                str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(hosts), "--no_ssh",
                "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", str(port),
                str(script), *map(str, args),
            ]  # fmt: skip
        else:
            cmd = helpers.torchrun_cmd(script, nproc, port, args)
        run_env = helpers.launch_env(repo_root, **(env or {}))
        proc = helpers.popen_group(cmd, env=run_env, cwd=cwd or repo_root)
        out, err, timed_out = helpers.communicate_group(proc, timeout)
        if timed_out:
            raise RanksFailed(
                f"{' '.join(cmd)}\ntimed out after {timeout}s\n"
                f"--- stdout ---\n{helpers.tail(out)}\n--- stderr ---\n{helpers.tail(err)}",
                subprocess.CompletedProcess(cmd, proc.returncode, out, err),
            )
        done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise RanksFailed(
                f"{' '.join(cmd)}\nexited with {proc.returncode}\n"
                f"--- stdout ---\n{helpers.tail(out)}\n--- stderr ---\n{helpers.tail(err)}",
                done,
            )
        return done

    run.Failed = RanksFailed
    return run
