"""P1: latent training overhead. Stage-3 (fusion) step time / stage-1 (CoT) step time on the same
token sequences, and ltscale's rollout vs the paper's per-column schedule, Coconut's loop and a
full recompute per latent column (bench/paper_schedules.py), all computing the same loss.

A step = forward + backward + AdamW step, fp32, one thread. Stage 1 runs the *same* ``input_ids``
with the model in ``cot`` mode (``<thinking>`` is an ordinary token there), so the ratio isolates
what the latent rollout costs, not the extra tokens. Latent layouts: ``n`` latents per row in the
response, sites drawn like the paper's (bench/common.py ``paper_like_sites``).

``before`` is the same model with packed passes and deferred weight gradients switched off
(``packed_passes=off``, ``defer_weight_grads=False``): the rollout as it was before those two
changes, kept as a variant so their speed-up is measured in the same run.

Sizes: tiny = configs/tiny.yaml's model, micro-batch 16 x ~128 tokens; smol = SmolLM2-135M's shape
(random init), 2 x ~64 tokens (a larger batch does not fit the 15-minute CPU budget). Coconut's
loop and the full recompute take ~50 s per step at tiny/16x128, so they are timed side by side
with ours on a smaller tiny batch (4 x ~64, 8 latents).

Run: ``.venv/bin/python bench/train_overhead.py [--size full|smoke]``
"""

from __future__ import annotations

import torch
from common import build_lm, interleaved, main, make_batch, md_table, median, paired_ratio, spec
from paper_schedules import SCHEDULES, per_column_calls

TOL = 1e-4  # relative loss agreement in fp32 (the fp64 agreement is ~1e-15, see tests)


def step_fns(lm, batch, variants):
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-6)

    def loss_of(v):
        if v == "cot":
            lm.set_latent_mode("cot")
            try:
                return lm(**batch, return_logits=False).loss
            finally:
                lm.set_latent_mode("fusion")
        if v == "ours":
            return lm(**batch, return_logits=False).loss
        if v == "before":  # this session's starting point: padded passes, a V x d / weight grad per pass
            lm.packed_passes, lm.defer_weight_grads = "off", False
            try:
                return lm(**batch, return_logits=False).loss
            finally:
                lm.packed_passes, lm.defer_weight_grads = "auto", True
        return SCHEDULES[v](lm, **batch)

    def make(v):
        def f():
            loss = loss_of(v)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return f

    return {v: make(v) for v in variants}, loss_of


def check_same_loss(loss_of, variants) -> dict[str, float]:
    with torch.no_grad():
        ref = float(loss_of("ours"))
        out = {}
        for v in variants:
            if v in ("ours", "cot"):
                continue
            got = float(loss_of(v))
            assert abs(got - ref) <= TOL * abs(ref), (
                f"{v} loss {got} != ours {ref}: the comparison would be unfair"
            )
            out[v] = got
    return {"ours": ref, **out}


def measure(model: str, batch: int, length: int, n_latents: int, variants: list[str], reps: int) -> dict:
    ms = spec(model)
    lm = build_lm(ms, "fusion")
    b = make_batch(ms, batch, length, n_latents, seed=n_latents)
    fns, loss_of = step_fns(lm, b, variants)
    losses = check_same_loss(loss_of, variants)
    times = interleaved(fns, reps=reps, warmup=0)
    out = {
        "model": model,
        "batch": batch,
        "tokens": int(b["attention_mask"].sum()),
        "latents_per_row": n_latents,
        "passes_ours": lm.count_passes(b["input_ids"], b["attention_mask"]),
        "passes_per_column": per_column_calls(b["input_ids"], b["attention_mask"], ms.thinking_id),
        "losses": losses,
        "median_s": {v: median(t) for v, t in times.items()},
        "reps": reps,
    }
    if "cot" in variants:
        out["stage3_over_stage1"] = paired_ratio(times, "ours", "cot")
    for v in variants:
        if v not in ("cot", "ours"):
            out[f"speedup_vs_{v}"] = paired_ratio(times, v, "ours")
    return out


def run(size: str = "full") -> dict:
    if size == "full":
        cases = [("tiny", 16, 128, n, ["cot", "ours", "before", "per_column"], 3) for n in (8, 16)]
        cases += [("smol", 2, 64, n, ["cot", "ours", "before", "per_column"], 2) for n in (8, 16)]
        cases += [("tiny", 4, 64, 8, ["ours", "per_column", "coconut", "recompute"], 2)]
    else:
        cases = [("micro", 2, 24, 3, ["cot", "ours", "before", *SCHEDULES], 1)]
    results, rows = [], []
    for model, bsz, length, n, variants, reps in cases:
        r = measure(model, bsz, length, n, variants, reps)
        results.append(r)
        ms_ = r["median_s"]
        rows.append(
            [
                model,
                f"{bsz} x ~{length}",
                n,
                r["passes_ours"],
                r["passes_per_column"],
                f"{r['stage3_over_stage1']:.2f}x" if "stage3_over_stage1" in r else "-",
                *(
                    f"{r[f'speedup_vs_{v}']:.2f}x" if f"speedup_vs_{v}" in r else "-"
                    for v in ("before", "per_column", "coconut", "recompute")
                ),
                " / ".join(f"{v} {ms_[v]:.2f}" for v in variants),
            ]
        )
        print(
            f"P1 {model} b{bsz} n={n}: stage3/stage1 {r.get('stage3_over_stage1', float('nan')):.2f}x, "
            + ", ".join(
                f"ours vs {v} {r[f'speedup_vs_{v}']:.2f}x" for v in variants if f"speedup_vs_{v}" in r
            ),
            flush=True,
        )
    table = md_table(
        [
            "model",
            "batch",
            "latents/row",
            "passes ours",
            "passes per-column",
            "stage3/stage1",
            "speed-up vs before",
            "speed-up vs per-column",
            "vs Coconut",
            "vs full recompute",
            "median s/step",
        ],
        rows,
    )
    print(table)
    heads = [
        f"{r['model']}/{r['latents_per_row']}: {r['stage3_over_stage1']:.2f}x"
        for r in results
        if "stage3_over_stage1" in r
    ]
    return {
        "bench": "P1 training overhead",
        "goal": "stage3/stage1 <= 1.3",
        "cases": results,
        "table": table,
        "headline": "stage3/stage1 " + ", ".join(heads),
    }


if __name__ == "__main__":
    main(run)
