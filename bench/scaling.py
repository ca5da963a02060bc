"""P6: data-parallel scaling on CPU. Training throughput (samples/s) of 2 ZeRO-3 ranks / 1 rank.

Weak scaling, as the trainer runs: every rank takes a micro-batch of 16 (configs/tiny.yaml) of the
tiny model in stage-1 (CoT) mode through the DeepSpeed engine (ds_configs/zero3.json, gloo,
torch AdamW). Each launch (``torch.distributed.run``) times ``--steps`` steps after 2 warm-up
steps; rank 0 reports global samples/s. The parent alternates 1-rank and 2-rank launches (ABBA
order) and takes the median per world size.

Caveat: on a 2-core box the 2-rank run owns every core, so anything else running (other users,
the launcher itself) comes straight out of its throughput; 1.6x needs a quiet machine.

Run: ``.venv/bin/python bench/scaling.py``   (worker: ``torchrun ... bench/scaling.py --worker``)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import build_lm, emit, make_batch, md_table, spec

HERE = Path(__file__).resolve().parent


def worker(steps: int, micro: int, length: int, out: str | None) -> dict:
    from ltscale.engine import build_engine, init_distributed, render_ds_config, shutdown_distributed

    info = init_distributed()
    ms = spec("tiny")
    lm = build_lm(ms, "cot", seed=0)
    ds = render_ds_config(
        "zero3", micro_batch=micro, grad_accum=1, world_size=info.world_size, grad_clip=1.0, precision="fp32"
    )
    engine = build_engine(
        lm, ds_config=ds, lr=1e-4, weight_decay=0.0, external_parameters=lm.zero3_external_parameters()
    )
    b = make_batch(ms, micro, length, 0, seed=info.rank)
    times = []
    for i in range(2 + steps):
        t0 = time.perf_counter()
        loss = engine(**b, return_logits=False).loss
        engine.backward(loss)
        engine.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    res = {
        "world": info.world_size,
        "step_s": statistics.median(times),
        "samples_per_s": micro * info.world_size / statistics.median(times),
    }
    if info.is_main and out:
        Path(out).write_text(json.dumps(res))
    engine.destroy()
    shutdown_distributed()
    return res


def launch(world: int, steps: int, micro: int, length: int, port: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(world),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(HERE / "scaling.py"),
            "--worker",
            "--steps",
            str(steps),
            "--micro",
            str(micro),
            "--length",
            str(length),
            "--out",
            out,
        ]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
            "LTSCALE_BENCH_JSON": "",
        }
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return json.loads(Path(out).read_text())


def run(size: str = "full", port: int = 29731) -> dict:
    steps, micro, length, order = (6, 16, 128, [1, 2, 2, 1]) if size == "full" else (1, 2, 16, [1])
    got: dict[int, list[float]] = {1: [], 2: []}
    for i, w in enumerate(order):
        got[w].append(launch(w, steps, micro, length, port + i)["samples_per_s"])
    med = {w: statistics.median(v) for w, v in got.items() if v}
    ratio = med[2] / med[1] if 2 in med else float("nan")
    table = md_table(
        ["ranks", "samples/s (median)", "runs", "ratio to 1 rank"],
        [[w, med[w], len(got[w]), f"{med[w] / med[1]:.2f}x"] for w in sorted(med)],
    )
    print(table)
    print(f"P6 scaling: 2-rank / 1-rank ZeRO-3 throughput {ratio:.2f}x (goal >= 1.6x)", flush=True)
    return {
        "bench": "P6 scaling",
        "goal": ">= 1.6x",
        "micro_batch_per_rank": micro,
        "steps": steps,
        "samples_per_s": got,
        "ratio_2_over_1": ratio,
        "table": table,
        "load_average": os.getloadavg(),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--size", default="full", choices=["full", "smoke"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--out", default=None)
    p.add_argument("--local_rank", type=int, default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.worker:
        worker(a.steps, a.micro, a.length, a.out)
    else:
        emit(run(a.size))
