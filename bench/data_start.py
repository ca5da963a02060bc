"""Data at scale: time from launch to the first optimizer step, and peak RSS per rank.

What it runs: the tiny default config (configs/tiny.yaml) on ``N`` synthetic problems written by
``ltscale data synth --n N`` (the same generator the embedded default uses), two CPU ranks under
the DeepSpeed launcher, ``LTSCALE_FAULT=hang:step:1`` so that every rank stops right after its
first backward. "First start" launches on an empty run dir; "restart" launches again on the same
run dir (what a resume or a Slurm requeue does before its checkpoint is loaded: the data work
is what differs, the checkpoint load is the same as before).

Time is wall clock from ``Popen`` to the moment both ranks have reported the fault point. Peak
RSS is each rank's ``VmHWM`` (the kernel's resident high-water mark), read from ``/proc`` until
the rank reaches the fault point and once more after, so nothing of the first step is missed.

Usage::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/python bench/data_start.py --n 385000 --n 38500
    # --json out.json writes the rows; --workdir keeps the generated files between runs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULT_RE = re.compile(r"ltscale fault injection: hang at step hit 1 \(rank (\d+)\)")


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (the launcher starts one more launcher, which starts the ranks)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _rank_of(pid: int) -> int | None:
    """The rank a process runs (the launcher appends ``--local_rank=<i>`` to train.py's argv)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not any(a.endswith(b"ltscale/train.py") for a in argv):
        return None
    for a in argv:
        if a.startswith(b"--local_rank="):
            return int(a.split(b"=", 1)[1])
    return None


def _hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def launch(run_dir: Path, data_file: Path, ranks: int, port: int, timeout: float) -> dict:
    """One launch up to every rank's first step -> {seconds, peak RSS per rank in bytes}."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        LTSCALE_FAULT="hang:step:1",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    cmd = [
        str(Path(sys.executable).with_name("deepspeed")),
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(port),
        str(ROOT / "ltscale" / "train.py"),
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"run_dir={run_dir}",
        f"data.train={data_file}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    reached: dict[int, float] = {}
    tail: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            tail.append(line)
            del tail[:-40]
            for m in FAULT_RE.finditer(line):  # the ranks' messages may share a line
                reached.setdefault(int(m.group(1)), time.perf_counter() - t0)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak: dict[int, int] = {}
    try:
        while len(reached) < ranks:
            if proc.poll() is not None or time.perf_counter() - t0 > timeout:
                raise RuntimeError(
                    f"launch ended (rc {proc.poll()}) or timed out before the first step:\n" + "".join(tail)
                )
            for pid in _children(proc.pid):
                rank = _rank_of(pid)
                kib = _hwm_kib(pid) if rank is not None else None
                if kib is not None:
                    peak[rank] = max(peak.get(rank, 0), kib)
            time.sleep(0.05)
        for pid in _children(proc.pid):  # the ranks now sleep at the fault point: final high-water marks
            rank = _rank_of(pid)
            kib = _hwm_kib(pid) if rank is not None else None
            if kib is not None:
                peak[rank] = max(peak.get(rank, 0), kib)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {"seconds": max(reached.values()), "peak_rss": {r: kib * 1024 for r, kib in sorted(peak.items())}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, action="append", help="problems (repeatable; default 385000 and 38500)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--port", type=int, default=29571)
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--workdir", default=None, help="keep data files and run dirs here (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args(argv)
    sizes = args.n or [385000, 38500]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ltscale-data-start-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sizes:
        data_file = work / f"synth-{n}.jsonl"
        if not data_file.is_file():
            subprocess.run(
                [
                    str(Path(sys.executable).with_name("ltscale")),
                    "data",
                    "synth",
                    "--n",
                    str(n),
                    "--out",
                    str(data_file),
                ],
                check=True,
                cwd=ROOT,
            )
        run_dir = work / f"run-{n}-{os.getpid()}"
        for kind in ("first start", "restart"):
            r = launch(run_dir, data_file, args.ranks, args.port, args.timeout)
            row = {
                "n": n,
                "launch": kind,
                "seconds": round(r["seconds"], 1),
                "peak_rss_gb": {k: round(v / 1e9, 3) for k, v in r["peak_rss"].items()},
                "load_avg_1min": round(os.getloadavg()[0], 1),
            }  # other processes share the box
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| problems | launch | launch -> first step (s) | peak RSS per rank (GB) | load avg |")
    print("|---:|---|---:|---|---:|")
    for r in rows:
        rss = ", ".join(f"rank {k}: {v}" for k, v in r["peak_rss_gb"].items())
        print(f"| {r['n']:,} | {r['launch']} | {r['seconds']} | {rss} | {r['load_avg_1min']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
