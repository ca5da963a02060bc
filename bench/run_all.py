"""`make bench`: run every CPU benchmark in bench/ and print its table (see bench/RESULTS.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (script, launcher args): multi-rank benches go through torchrun on 127.0.0.1; None = one plain process
BENCHES = [
    ("allgather_passes.py", ["--nproc_per_node", "2"]),
    ("fusion_op.py", None),
]


def main() -> int:
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
    failed = 0
    for script, launch in BENCHES:
        print(f"== {script}", flush=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "--master_addr", "127.0.0.1",
               "--master_port", "29690", str(HERE / script)] if launch is not None else [sys.executable, str(HERE / script)]
        failed += subprocess.run(cmd, env=env).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
