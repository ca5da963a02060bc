"""Activation memory: bytes a training step keeps for backward, per token and per decoder layer,
measured and against ``ltscale/model/memory.py``'s formula.

Measured with ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves during the
forward, counted once per storage (a view shares its base's bytes), parameters excluded. Under
gradient checkpointing the checkpoint's own hooks stand between, so what it keeps (the inputs of
each pass, recomputed from in backward) is what is counted.

Per layer = (bytes at 4 layers - bytes at 2 layers) / 2 / tokens; the rest ("fixed") is what lies
outside the layers. Shapes: the tiny default and SmolLM2-135M (random init, layer count cut to 2 and
4), 4 rows of ~64 tokens, stage 1 (``cot``, one pass) and a stage-3 step (``fusion``, 4 latents per
row drawn like the paper's insertions), gradient checkpointing off and on, fp32 and bf16.

``--measure-only`` skips the formula (runs on a tree without ``ltscale/model/memory.py``: the
"before" column of bench/RESULTS.md).
Run: ``.venv/bin/python bench/activation_memory.py [--size full|smoke] [--measure-only]``
"""

from __future__ import annotations

import argparse

import torch
from common import build_lm, emit, make_batch, md_table, spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def saved_bytes(lm, batch: dict) -> int:
    """Unique storage bytes autograd saves in one forward (parameters excluded), then backward."""
    params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lm(**batch, return_logits=False)
    out.loss.backward()  # the hooks must leave a working graph
    return sum(saved.values())


def measure(model: str, mode: str, ckpt: bool, dtype: str, bsz: int, length: int, latents: int) -> dict:
    ms = spec(model)
    batch = make_batch(ms, bsz, length, latents if mode == "fusion" else 0, seed=1)
    tokens = int(batch["attention_mask"].sum())
    by_layers = {}
    for layers in (2, 4):
        ms.shape["num_hidden_layers"] = layers
        lm = build_lm(ms, mode, dtype=DTYPES[dtype], gradient_checkpointing=ckpt).train()
        by_layers[layers] = saved_bytes(lm, batch)
    per_layer = (by_layers[4] - by_layers[2]) / 2 / tokens
    return {
        "tokens": tokens,
        "per_layer": per_layer,
        "fixed": by_layers[2] / tokens - 2 * per_layer,
        "ms": ms,
        "batch": batch,
        "lm": lm,
    }


def formula(m: dict, mode: str, ckpt: bool, dtype: str) -> tuple[float, float, dict]:
    from ltscale.model import memory
    from ltscale.model.packed import gqa_groups
    from ltscale.model.rollout_plan import plan_rollout

    lm, b = m["lm"], m["batch"]
    plan = plan_rollout(b["input_ids"], b["attention_mask"], lm.thinking_token_id if lm.uses_rollout else -1)
    st = memory.plan_stats(plan, gqa_groups(lm.base.config))
    nbytes = DTYPES[dtype].itemsize
    per_layer = memory.layer_bytes_per_token(
        lm.base.config, dtype_bytes=nbytes, checkpointing=ckpt,
        **{k: st[k] for k in ("query_slots_per_token", "keys_per_token", "kv_held_fraction")},
    )  # fmt: skip
    fixed = memory.fixed_bytes_per_token(
        lm.base.config, dtype_bytes=nbytes, checkpointing=ckpt, mode=mode,
        latent_fraction=st["latent_fraction"], mask_elems_per_token=st["mask_elems_per_token"],
    )  # fmt: skip
    return per_layer, fixed, st


def run(size: str = "full", measure_only: bool = False) -> dict:
    models, dtypes = (("tiny", "smol"), ("fp32", "bf16")) if size == "full" else (("micro",), ("fp32",))
    bsz, length, latents = (4, 64, 4) if size == "full" else (2, 16, 2)
    rows, results = [], []
    for model in models:
        for dtype in dtypes:
            for mode in ("cot", "fusion"):
                for ckpt in (False, True):
                    m = measure(model, mode, ckpt, dtype, bsz, length, latents)
                    r = {
                        "model": model,
                        "dtype": dtype,
                        "mode": mode,
                        "ckpt": ckpt,
                        "tokens": m["tokens"],
                        "per_layer": m["per_layer"],
                        "fixed": m["fixed"],
                    }
                    row = [
                        model,
                        dtype,
                        "stage 1 (cot)" if mode == "cot" else "stage 3 (fusion)",
                        "on" if ckpt else "off",
                        round(m["per_layer"]),
                        round(m["fixed"]),
                    ]
                    if not measure_only:
                        per_layer, fixed, st = formula(m, mode, ckpt, dtype)
                        r.update(formula_per_layer=per_layer, formula_fixed=fixed, stats=st)
                        row[4:4] = [st["passes"]]
                        row += [
                            round(per_layer),
                            f"{m['per_layer'] / per_layer:.3f}" if per_layer else "-",
                            round(fixed),
                        ]
                    rows.append(row)
                    results.append(r)
    header = ["model", "dtype", "step", "grad ckpt", "measured B/token/layer", "measured fixed B/token"]
    if not measure_only:
        header[4:4] = ["passes"]
        header += ["formula B/token/layer", "measured / formula", "formula fixed B/token"]
    table = md_table(header, rows)
    print(table)
    res = {"bench": "activation memory", "batch": bsz, "length": length, "latents_per_row": latents,
           "table": table, "rows": results}  # fmt: skip
    if not measure_only:
        worst = max(
            abs(r["per_layer"] / r["formula_per_layer"] - 1) for r in results if r["formula_per_layer"]
        )
        res["headline"] = f"per-layer formula within {100 * worst:.1f}% of the measurement"
    else:
        res["headline"] = "measured only"
    print(res["headline"])
    return res


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="full", choices=["full", "smoke"])
    p.add_argument("--measure-only", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    emit({k: v for k, v in run(a.size, a.measure_only).items()})
