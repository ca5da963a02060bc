"""Memory: peak RSS of a stage-3 (fusion) training step vs a stage-1 (CoT) step on the same
sequences, with ltscale's gradient checkpointing (``model.gradient_checkpointing``) off and on.

Each variant runs in its own process (a freed allocation is not returned to the OS, so a shared
process would only ever show the largest variant). A child builds the model, records its RSS, runs
one forward + backward and reports ``ru_maxrss``; "step" = peak - RSS before the step, i.e. the
activations, gradients and temporaries of the step (weights excluded). RSS is not timing-noisy,
so each variant runs once (raise ``REPS`` to keep the smallest of several). The child also reports
the bytes autograd saved for backward in that forward (``activation_memory.saved_bytes``): exact,
unlike RSS, which the allocator's reuse of freed pages blurs.

Model: SmolLM2-135M's shape (random init), 2 x ~64 tokens, 8 latents per row (P1's smol case).
Run: ``.venv/bin/python bench/memory.py [--size full|smoke]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
from activation_memory import saved_bytes
from common import build_lm, emit, make_batch, md_table, spec

HERE = Path(__file__).resolve().parent
REPS = 1


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(model: str, mode: str, ckpt: bool, batch: int, length: int, n: int) -> dict:
    ms = spec(model)
    lm = build_lm(ms, mode, gradient_checkpointing=ckpt).train()
    b = make_batch(ms, batch, length, n, seed=n)
    before = rss_mb()
    saved = saved_bytes(lm, b)  # one forward + backward
    # The kernel updates the high-water mark lazily, so it can trail the current RSS by a few pages.
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_mb())
    return {
        "mode": mode,
        "checkpointing": ckpt,
        "rss_before_mb": before,
        "peak_mb": peak,
        "step_mb": peak - before,
        "saved_mb": saved / 2**20,
    }


def run(size: str = "full") -> dict:
    model, batch, length, n = ("smol", 2, 64, 8) if size == "full" else ("micro", 2, 24, 3)
    variants = [(m, c) for m in ("cot", "fusion") for c in (False, True)]
    best: dict[tuple[str, bool], dict] = {}
    for rep in range(REPS if size == "full" else 1):
        for mode, ckpt in variants if rep % 2 == 0 else variants[::-1]:
            cmd = [
                sys.executable,
                str(HERE / "memory.py"),
                "--child",
                model,
                mode,
                str(int(ckpt)),
                str(batch),
                str(length),
                str(n),
            ]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "LTSCALE_BENCH_JSON": ""}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            key = (mode, ckpt)
            if key not in best or r["step_mb"] < best[key]["step_mb"]:
                best[key] = r
    base = best[("cot", False)]["step_mb"]
    rows = [
        [
            m,
            "on" if c else "off",
            best[(m, c)]["peak_mb"],
            best[(m, c)]["step_mb"],
            f"{best[(m, c)]['step_mb'] / base:.2f}x",
            best[(m, c)]["saved_mb"],
        ]
        for m, c in variants
    ]
    table = md_table(
        [
            "mode",
            "grad ckpt",
            "peak RSS MB",
            "step MB (peak - before)",
            "step / CoT no-ckpt",
            "saved for backward MB",
        ],
        rows,
    )
    print(table)
    res = {
        "bench": "memory",
        "model": model,
        "batch": batch,
        "latents_per_row": n,
        "table": table,
        "variants": {f"{m}{'+ckpt' if c else ''}": best[(m, c)] for m, c in variants},
        "stage3_over_stage1_step_mb": best[("fusion", False)]["step_mb"] / base,
        "ckpt_saving_stage3": 1 - best[("fusion", True)]["step_mb"] / best[("fusion", False)]["step_mb"],
        "ckpt_saving_stage1": 1 - best[("cot", True)]["step_mb"] / base,
    }
    res["headline"] = (
        f"stage3/stage1 {res['stage3_over_stage1_step_mb']:.2f}x; ckpt saves "
        f"{100 * res['ckpt_saving_stage3']:.0f}% (st3) {100 * res['ckpt_saving_stage1']:.0f}% (st1)"
    )
    print(
        f"memory: stage3/stage1 step memory {res['stage3_over_stage1_step_mb']:.2f}x; checkpointing saves "
        f"{100 * res['ckpt_saving_stage3']:.0f}% (stage 3), {100 * res['ckpt_saving_stage1']:.0f}% (stage 1)"
    )
    return res


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        torch.set_num_threads(1)
        m, mode, ck, bsz, length, n = sys.argv[2:8]
        print(json.dumps(child(m, mode, bool(int(ck)), int(bsz), int(length), int(n))))
        sys.exit(0)
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="full", choices=["full", "smoke"])
    emit(run(p.parse_args().size))
