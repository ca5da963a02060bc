"""Launch a tiny 2-rank training job with plain ``RANK/WORLD_SIZE`` env (no torchrun, no deepspeed
launcher), so what is tested is ltscale's own behaviour when a rank dies, hangs or is killed: a
launcher that tears the job down on the first failure would hide it. ``LTSCALE_FAULT`` (see
``ltscale/faults.py``) places the fault deterministically.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.helpers import DIST_ENV, free_port, launch_env

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "ltscale" / "train.py"

# 3 stages x 6 steps of a 2-layer, hidden-32 Llama on 48 synthetic problems (global batch 8).
TINY = [
    "model.init.hidden_size=32", "model.init.intermediate_size=64", "model.init.num_hidden_layers=2",
    "model.tokenizer_vocab_size=120", "data.synthetic.n_train=48", "data.synthetic.n_test=4",
    "stages.0.epochs=1", "stages.1.epochs=1", "stages.2.epochs=1", "stages.1.lr_scale=1.0", "stages.2.lr_scale=1.0",
    "train.micro_batch_size=4", "train.grad_accum=1", "train.log_every=1", "train.save_every=2",
    "train.keep_last_n=2", "eval.after_each_stage=false", "train.scoring_batch_size=8",
]  # fmt: skip
STEPS_PER_STAGE = 6

# The launch variables are set per rank below; a leftover LTSCALE_FAULT would inject a fault.
_DROP = (*DIST_ENV, "LTSCALE_FAULT")


@dataclass
class Job:
    procs: list[subprocess.Popen]
    logs: list[Path]

    def output(self, rank: int | None = None) -> str:
        ranks = range(len(self.logs)) if rank is None else [rank]
        return "".join(
            f"--- rank {r} ---\n{self.logs[r].read_text(errors='replace')[-6000:]}\n" for r in ranks
        )

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def wait(self, timeout: float, *, kill_all_on_sigkill: bool = False) -> list[int]:
        """Exit codes of every rank. ``kill_all_on_sigkill``: once one rank died of SIGKILL, SIGKILL
        the rest at once (a node loss / OOM kill of the whole job, not a lone dead rank)."""
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in self.procs):
                if kill_all_on_sigkill and any(p.poll() == -signal.SIGKILL for p in self.procs):
                    self.kill()
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"job did not finish within {timeout}s\n{self.output()}")
                time.sleep(0.05)
        finally:
            if any(p.poll() is None for p in self.procs):
                self.kill()
        return [p.returncode for p in self.procs]


def launch(run_dir: Path, extra: list[str] = (), *, fault: str | None = None, nproc: int = 2,
           args: list[str] = (), tag: str = "") -> Job:  # fmt: skip
    port = free_port()
    logs = []
    procs = []
    for rank in range(nproc):
        env = launch_env(drop=_DROP, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        if fault:
            env["LTSCALE_FAULT"] = fault
        log = run_dir.parent / f"{run_dir.name}{tag}.rank{rank}.log"
        logs.append(log)
        with open(log, "a") as f:
            procs.append(subprocess.Popen(
                [sys.executable, str(TRAIN), *args, *TINY, *extra, f"run_dir={run_dir}"],
                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    return Job(procs, logs)


def run(run_dir: Path, extra: list[str] = (), *, timeout: float = 240, **kw) -> tuple[list[int], Job]:
    job = launch(run_dir, extra, **kw)
    return job.wait(timeout), job


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "stage3" / "hf" / "model.safetensors"))


def zero_weights(ckpt_root: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a ZeRO checkpoint (consolidated offline by DeepSpeed's zero_to_fp32)."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].detach().double() - b[k].detach().double()).abs().max()) for k in a)
