"""What the stage's fixed pass count costs a batch that needs fewer passes.

The trainer runs every step of a stage at the stage's maximum pass count (1 + the most latents any
example of the stage holds), so that ZeRO-3 ranks stay in lockstep and DeepSpeed's parameter trace
stays valid. A batch whose rows hold fewer latents runs the extra passes empty. Measured: one
training step (forward + backward, stage 3 ``fusion``) of a batch that needs ``needed`` passes, at
``min_passes = needed`` and at ``min_passes = stage max``; the ratio is the price of lockstep.

Model: SmolLM2-135M's shape (random init), 4 rows of ~64 tokens with 2 latents each (3 passes),
stage max 17 (the paper's 8 insertion sites, each possibly doubled). Interleaved timing, paired
ratios (bench/common.py).
Run: ``.venv/bin/python bench/lockstep_passes.py [--size full|smoke]``
"""

from __future__ import annotations

from common import build_lm, interleaved, main, make_batch, md_table, median, paired_ratio, spec


def run(size: str = "full") -> dict:
    model, bsz, length, latents, stage_max, reps = (
        ("smol", 4, 64, 2, 17, 5) if size == "full" else ("micro", 2, 16, 1, 5, 1)
    )
    ms = spec(model)
    lm = build_lm(ms, "fusion").train()
    batch = make_batch(ms, bsz, length, latents, seed=3)
    needed = lm.count_passes(batch["input_ids"], batch["attention_mask"])

    def step(passes: int):
        def go():
            lm.zero_grad(set_to_none=True)
            out = lm(**batch, min_passes=passes, return_logits=False)
            out.loss.backward()

        return go

    times = interleaved({"needed": step(needed), "stage_max": step(stage_max)}, reps=reps)
    ratio = paired_ratio(times, "stage_max", "needed")
    per_empty = (median(times["stage_max"]) - median(times["needed"])) / (stage_max - needed)
    rows = [
        ["min_passes = needed", needed, f"{median(times['needed']):.3f}", "1.00x"],
        ["min_passes = stage max", stage_max, f"{median(times['stage_max']):.3f}", f"{ratio:.2f}x"],
    ]
    table = md_table(["step", "passes", "median s", "vs needed"], rows)
    print(table)
    res = {
        "bench": "lockstep passes",
        "model": model,
        "batch": bsz,
        "needed": needed,
        "stage_max": stage_max,
        "table": table,
        "ratio_stage_max_over_needed": ratio,
        "empty_pass_over_step": per_empty / median(times["needed"]),
        "headline": f"{stage_max - needed} empty passes cost {ratio:.2f}x the step "
        f"({100 * per_empty / median(times['needed']):.1f}% of a needed step each)",
    }
    print(res["headline"])
    return res


if __name__ == "__main__":
    main(run)
