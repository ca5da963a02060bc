"""`make bench`: run every CPU benchmark in bench/ and print its table (see bench/RESULTS.md).

Each benchmark runs in its own process (clean memory, one failure does not stop the rest). A
benchmark that writes its result dict as JSON to ``$LTSCALE_BENCH_JSON`` gets a row in the summary
table printed at the end and saved to ``runs/bench/results.json`` (``--out`` to change).
``--only NAME [NAME ...]`` runs a subset (script names without ``.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (script, launcher args): multi-rank benches go through torchrun on 127.0.0.1; None = one plain process
BENCHES = [
    ("allgather_passes.py", ["--nproc_per_node", "2"]),
    ("fusion_op.py", None),
    ("train_overhead.py", None),
    ("forward_calls.py", None),
    ("decoding.py", None),
    ("memory.py", None),
    ("activation_memory.py", None),
    ("host_syncs.py", None),
    ("lockstep_passes.py", None),
    ("scaling.py", None),
]

# The one ratio each benchmark is judged by: (result key path, goal text).
HEADLINES = {
    "allgather_passes.py": ("max_ratio", "<= 1.2x a 1-pass step"),
    "fusion_op.py": ("headline", ">= 5x dense reference (CPU, worst cell)"),
    "train_overhead.py": ("headline", "<= 1.3x"),
    "forward_calls.py": ("headline", "fewer calls than per-column"),
    "decoding.py": ("headline", ">= 0.8x HF, >= 10x batch-1 loop"),
    "memory.py": ("headline", "report"),
    "activation_memory.py": ("headline", "formula within 1% per layer"),
    "host_syncs.py": ("headline", "0 per pass (fusion: its kept-set read)"),
    "lockstep_passes.py": ("headline", "report"),
    "scaling.py": ("ratio_2_over_1", ">= 1.6x"),
}


def headline(script: str, res: dict) -> str:
    key = HEADLINES.get(script, ("headline", ""))[0]
    val = res.get(key)
    if isinstance(val, float):
        return f"{val:.2f}x"
    return str(val) if val is not None else "(see output)"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--out", default=str(HERE.parent / "runs" / "bench" / "results.json"))
    args = p.parse_args()
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
    failed = 0
    summary: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="ltscale-bench-"))
    t_all = time.perf_counter()
    for script, launch in BENCHES:
        if args.only is not None and script.removesuffix(".py") not in args.only:
            continue
        print(f"== {script}", flush=True)
        out = tmp / f"{script}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "--master_addr", "127.0.0.1",
               "--master_port", "29690", str(HERE / script)] if launch is not None else [sys.executable, str(HERE / script)]
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env={**env, "LTSCALE_BENCH_JSON": str(out)}).returncode
        failed += rc != 0
        res = json.loads(out.read_text()) if out.is_file() else {}
        summary[script] = {"rc": rc, "seconds": time.perf_counter() - t0, "result": res}
    print(f"\n== summary ({time.perf_counter() - t_all:.0f} s, load average {os.getloadavg()[0]:.1f})")
    print("| benchmark | headline | goal | run | seconds |\n|---|---:|---|---|---:|")
    for script, s in summary.items():
        goal = HEADLINES.get(script, ("", ""))[1]
        status = "ran" if s["rc"] == 0 else f"FAILED rc={s['rc']}"
        print(f"| {script} | {headline(script, s['result'])} | {goal} | {status} | {s['seconds']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
