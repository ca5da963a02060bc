"""One training run of the GPU script, measured: ``python tests/gpu/curriculum.py PRESET OUT.json RUN_DIR``.

Presets (bf16, ZeRO-3 on one rank, the product's Trainer; ``LTSCALE_GPU_DRYRUN=1`` shrinks both to
seconds on CPU, same code path):

* ``tiny``: the embedded default (configs/tiny.yaml) through all three stages, each exported and
  evaluated (with the analyses).
* ``smollm2``: one LT-Tuning fusion stage (stage 3) of a randomly initialised model of
  SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads, tied 49152 vocabulary; its
  tokenizer when ``--tokenizer`` names the directory ``real_run.sh prepare`` extracts) on
  synthetic problems: throughput and memory of the latent rollout at a real model's shape.

Written to OUT.json: wall seconds, logged loss (first/last) and tokens/s per stage, peak device
memory (CUDA: ``max_memory_allocated``/``reserved``; dry run: the process's peak RSS), each stage
export's tensor dtypes, and the evaluation summaries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DRY = os.environ.get("LTSCALE_GPU_DRYRUN") == "1"

SMOLLM2_SHAPE = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "max_position_embeddings": 2048, "tie_word_embeddings": True,
}  # fmt: skip
FUSION_STAGE = {"mode": "fusion", "epochs": 1.0, "lr_scale": 1.0, "tau": 0.2, "max_sites": 8, "insert_prob": 0.95,
                "double_insert_prob": 0.2, "alpha": 0.6, "temperature": 1.0, "top_p": 0.9}  # fmt: skip


def tiny(run_dir: Path, tokenizer: str | None) -> list[str]:
    del tokenizer
    if DRY:
        sizes = ["model.init.hidden_size=32", "model.init.intermediate_size=64", "model.init.num_hidden_layers=2",
                 "model.tokenizer_vocab_size=120", "data.synthetic.n_train=16", "data.synthetic.n_test=2",
                 "stages.0.epochs=1", "stages.1.epochs=1", "stages.2.epochs=1", "train.micro_batch_size=8",
                 "eval.max_new_tokens=8", "eval.analysis=false", "train.scoring_batch_size=8"]  # fmt: skip
    else:
        sizes = ["data.synthetic.n_train=2048", "data.synthetic.n_test=100", "stages.0.epochs=1",
                 "stages.1.epochs=0.25", "stages.2.epochs=0.25", "eval.analysis_samples=8"]  # fmt: skip
    return [
        f"run_dir={run_dir}",
        "engine.precision=bf16",
        "train.log_every=4",
        "train.save_every=100000",
        *sizes,
    ]


def smollm2(run_dir: Path, tokenizer: str | None) -> list[str]:
    shape = dict(SMOLLM2_SHAPE)
    if DRY:
        shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)  # fmt: skip
    out = [f"run_dir={run_dir}", "engine.precision=bf16", f"model.init={json.dumps(shape)}",
           f"stages=[{json.dumps(FUSION_STAGE)}]", "train.log_every=4", "train.save_every=100000"]  # fmt: skip
    if tokenizer and not DRY:
        out.append(f"model.tokenizer={tokenizer}")
    else:  # the shape's vocabulary is the tokenizer's: say so in the result (vocab_size)
        out.append(f"model.tokenizer_vocab_size={120 if DRY else 8000}")
    if DRY:
        return out + ["data.synthetic.n_train=16", "data.synthetic.n_test=2", "train.micro_batch_size=8",
                      "eval.max_new_tokens=8", "eval.analysis=false", "train.scoring_batch_size=8"]  # fmt: skip
    return out + ["data.synthetic.n_train=640", "data.synthetic.n_test=64", "train.micro_batch_size=16",
                  "train.scoring_batch_size=64", "eval.batch_size=64", "eval.max_new_tokens=128",
                  "eval.analysis_samples=4", "optim.lr=3e-4"]  # fmt: skip


PRESETS = {"tiny": tiny, "smollm2": smollm2}


def peak_memory() -> dict[str, float]:
    import torch

    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        return {"cuda_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "cuda_max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}  # fmt: skip
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return {"host_peak_rss_gib": int(line.split()[1]) / 2**20}
    return {}


def export_dtypes(hf: Path) -> list[str]:
    from safetensors import safe_open

    dtypes: set[str] = set()
    for f in sorted(hf.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            dtypes |= {st.get_slice(name).get_dtype() for name in st.keys()}  # noqa: SIM118 - not a dict
    return sorted(dtypes)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("out")
    p.add_argument("run_dir")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir for the smollm2 preset")
    args = p.parse_args()
    from ltscale.monitor import read_scalars
    from ltscale.run_config import load_config
    from ltscale.trainer import train

    run_dir = Path(args.run_dir)
    cfg = load_config(None, PRESETS[args.preset](run_dir, args.tokenizer) + ["resume=never"])
    t0 = time.perf_counter()
    error = None
    try:
        train(cfg, "all")
    except Exception as e:  # noqa: BLE001 - recorded, then re-raised after the measurements are written
        error = e
    result: dict = {"preset": args.preset, "dry_run": DRY, "seconds": time.perf_counter() - t0, **peak_memory(),
                    "error": None if error is None else f"{type(error).__name__}: {error}", "stages": []}  # fmt: skip
    scalars = read_scalars(run_dir / "tb") if (run_dir / "tb").is_dir() else {}
    stage_of = dict(scalars.get("train/stage", []))
    for k, st in enumerate(cfg.stages, 1):
        sdir = run_dir / f"stage{k}"
        rows = {
            name: [v for s, v in scalars.get(name, []) if stage_of.get(s) == k]
            for name in ("train/loss", "perf/tokens_per_s", "latent/tokens_per_sample")
        }
        eval_file = sdir / "eval.json"
        result["stages"].append({
            "stage": k, "mode": st.mode, "complete": (sdir / "COMPLETE").is_file(),
            "loss_first": rows["train/loss"][0] if rows["train/loss"] else None,
            "loss_last": rows["train/loss"][-1] if rows["train/loss"] else None,
            "tokens_per_s": sum(rows["perf/tokens_per_s"]) / max(len(rows["perf/tokens_per_s"]), 1),
            "latent_per_sample": max(rows["latent/tokens_per_sample"], default=0.0),
            "export_dtypes": export_dtypes(sdir / "hf") if (sdir / "hf").is_dir() else [],
            "eval": json.loads(eval_file.read_text()) if eval_file.is_file() else None,
        })  # fmt: skip
    result["vocab_size"] = json.loads((run_dir / "stage1" / "hf" / "config.json").read_text())["vocab_size"] if (
        run_dir / "stage1" / "hf" / "config.json").is_file() else None  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if error is not None:
        raise error
    bad = [s["stage"] for s in result["stages"] if not s["complete"] or s["export_dtypes"] != ["BF16"]]
    if bad:
        print(f"curriculum: stages {bad} did not finish with a bf16 export", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
