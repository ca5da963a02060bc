"""Rank program for tests/dist/test_data_dist.py: every rank prepares the run's data the way the
trainer does (``prepare_data`` with the process group's broadcast and all-gather) and writes what it got to
``--out/rank<r>.json``: the fingerprint, the examples' digest, and whether this rank read the
training data at all."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ltscale import run_setup  # noqa: E402
from ltscale.run_config import load_config  # noqa: E402
from ltscale.data import records  # noqa: E402
from ltscale.engine import dist  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    info = dist.init_distributed(timeout_s=60)
    opened = []
    real = records.open_source

    def counting(source, split):
        opened.append(str(source))
        return real(source, split)

    records.open_source = run_setup.open_source = counting  # which rank reads the training data
    result: dict = {"rank": info.rank}
    try:
        cfg = load_config(None, args.overrides)
        ranks = run_setup.Ranks(info.rank, info.world_size, dist.broadcast_object, dist.all_gather_object)
        data = run_setup.prepare_data(cfg, Path(cfg.run_dir), ranks=ranks)
        h = hashlib.sha256()
        for i in range(len(data.train)):
            e = data.train[i]
            h.update(repr((e.id, e.input_ids, e.labels, e.prompt_len)).encode())
        result |= {"n": len(data.train), "digest": h.hexdigest(), "fingerprint": data.train.fingerprint}
    except Exception as e:  # noqa: BLE001 - reported to the test
        result["error"] = f"{type(e).__name__}: {e}"
    result["opened"] = opened
    Path(args.out, f"rank{info.rank}.json").write_text(json.dumps(result))
    dist.shutdown_distributed()


if __name__ == "__main__":
    main()
