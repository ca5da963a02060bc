"""P2: sequential forward calls per training batch, ltscale's rollout vs the paper's per-column
schedule, on insertion patterns produced by the real confidence-scoring pass; padding waste.

Insertion sites come from the product pipeline itself (``gold_token_probs`` -> ``select_sites``
with the stage-3 parameters tau=0.2, 8 sites, p=0.95, double 0.2), scored by the tiny model:

* ``runs/tiny/stage2/hf`` (the model stage 3 really scores with, written by ``make run``) when it
  exists, with its tokenizer; GSM8K test from ``LTSCALE_DATA_DIR`` (default ../shared/data) and the
  built-in synthetic problems;
* otherwise a random-init tiny model and a sentencepiece tokenizer trained here on synthetic
  text. An untrained model is unsure of every token, so every response token is a candidate and
  the sites are a uniform draw: the "synthetic pattern drawn like the paper's". The result names
  which source was used.

Batches: micro-batches of 16 (configs/tiny.yaml) drawn at random, right-padded by ``collate``.
Counted per batch: ours = ``len(plan_rollout(...).passes)``; the paper's = 1 + distinct latent
columns after its first-latent alignment. Padding waste = padded slots / all slots processed.
Ours has two numbers since passes are packed (``engine.packed_passes: auto``, ltscale/model/packed.py):
the Linear/MLP rows (each pass's real tokens, plus one dummy row in a pass with none) and the
attention query slots (each pass's ``B x width``: attention still runs per row, padded). The
paper's is the two-sided padded batch, for every op.

Run: ``.venv/bin/python bench/forward_calls.py``
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
from pathlib import Path

import torch
from common import ROOT, main, md_table
from paper_schedules import align_first_latent, latent_columns

from ltscale.data import (
    InsertionParams,
    apply_insertions,
    collate,
    encode_records,
    gold_token_probs,
    load_records,
    select_sites,
    synthetic_splits,
)
from ltscale.model.rollout import plan_rollout

STAGE3 = InsertionParams(tau=0.2, max_sites=8, insert_prob=0.95, double_insert_prob=0.2)


def load_scorer(size: str):
    """(forward_logits, tokenizer, thinking_id, source description)."""
    from ltscale.data import add_thinking_token, load_tokenizer, train_sentencepiece

    ckpt = ROOT / "runs" / "tiny" / "stage2" / "hf"
    if size != "smoke" and (ckpt / "ltscale_latent.json").is_file():
        from ltscale.model.io import load_latent_model

        lm, tok = load_latent_model(ckpt, mode="cot")
        think = lm.thinking_token_id
        source = f"trained tiny stage-2 checkpoint ({ckpt.relative_to(ROOT)})"
    else:
        from common import build_lm, spec

        train, _ = synthetic_splits(2000 if size != "smoke" else 200, 10, 1234)
        from ltscale.data.formatting import assistant_text

        tmp = Path(tempfile.mkdtemp(prefix="ltscale-bench-tok-"))
        train_sentencepiece(
            [t for r in train for t in (r.question, assistant_text(r))],
            tmp / "tok",
            vocab_size=200 if size != "smoke" else 120,
            seed=0,
        )
        tok = load_tokenizer(str(tmp / "tok"))
        think = add_thinking_token(tok)
        ms = spec("tiny" if size != "smoke" else "micro")
        ms.vocab = think  # <thinking> = vocab id, as build_lm expects
        lm = build_lm(ms, "cot")
        source = "random-init tiny model (uniform sites: every token is below tau)"
    lm.eval()

    def forward_logits(ids, mask):
        return lm.base(input_ids=ids, attention_mask=mask).logits

    return forward_logits, tok, think, source


def datasets(size: str, n: int) -> dict[str, list]:
    data_dir = Path(os.environ.get("LTSCALE_DATA_DIR", ROOT.parent / "shared" / "data"))
    out = {}
    gsm = data_dir / "gsm8k" / "test.jsonl"
    if gsm.is_file():
        out["gsm8k-test"] = load_records(gsm, limit=n)
    _, test = synthetic_splits(10, n, 4321, min_steps=1, max_steps=5, max_value=30, max_operand=9)
    out["synthetic"] = test
    return out


def batch_stats(batch: dict[str, torch.Tensor], think: int) -> dict[str, float]:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = int(mask.sum())
    plan = plan_rollout(ids, mask, think)
    ours_slots = sum(p.bsz * p.width for p in plan.passes)
    linear_rows = sum(p.n_run for p in plan.passes)
    a_ids, a_mask, _, _ = align_first_latent(ids, mask, batch["labels"], think)
    return {
        "ours": len(plan.passes),
        "paper": 1 + len(latent_columns(a_ids, a_mask, think)),
        "ours_waste": 1 - real / ours_slots,
        "ours_linear_waste": 1 - real / linear_rows,
        "paper_waste": 1 - real / a_ids.numel(),
        "plain_waste": 1 - real / ids.numel(),
        "latents": int(((ids == think) & mask.bool()).sum()),
        "max_latents": int(((ids == think) & mask.bool()).sum(1).max()),
    }


def run(size: str = "full") -> dict:
    n_examples, micro, n_batches = (256, 16, 32) if size == "full" else (24, 4, 3)
    forward_logits, tok, think, source = load_scorer(size)
    rows, result = [], {"bench": "P2 forward calls", "scorer": source, "micro_batch": micro, "patterns": {}}
    for name, records in datasets(size, n_examples).items():
        enc = encode_records(tok, records, max_length=512, strict=False)
        probs = gold_token_probs(forward_logits, enc, batch_size=16, pad_id=tok.pad_token_id)
        scored = [
            apply_insertions(
                e, select_sites(p, e.prompt_len, STAGE3, seed=42, sample_index=i, stage=3), think
            )
            for i, (e, p) in enumerate(zip(enc, probs))
        ]
        rng = random.Random(0)
        stats = []
        for _ in range(n_batches):
            stats.append(batch_stats(collate(rng.sample(scored, micro), pad_id=tok.pad_token_id), think))
        med = {k: statistics.mean(s[k] for s in stats) for k in stats[0]}
        per_ex = [sum(t == think for t in e.input_ids) for e in scored]
        stage_passes = 1 + max(per_ex)  # the trainer's lockstep count for the whole stage
        ratio = statistics.median(s["paper"] / s["ours"] for s in stats)
        result["patterns"][name] = {
            "examples": len(scored),
            "mean_len": statistics.mean(len(e.input_ids) for e in scored),
            "mean_latents_per_example": statistics.mean(per_ex),
            "calls_ours": med["ours"],
            "calls_paper": med["paper"],
            "calls_ratio_paper_over_ours": ratio,
            "stage_lockstep_calls": stage_passes,
            "pad_waste_ours_attention": med["ours_waste"],
            "pad_waste_ours_linear": med["ours_linear_waste"],
            "pad_waste_paper": med["paper_waste"],
            "pad_waste_plain_cot": med["plain_waste"],
        }
        rows.append(
            [
                name,
                len(scored),
                statistics.mean(per_ex),
                med["ours"],
                med["paper"],
                ratio,
                stage_passes,
                f"{100 * med['ours_linear_waste']:.1f}%",
                f"{100 * med['ours_waste']:.1f}%",
                f"{100 * med['paper_waste']:.1f}%",
                f"{100 * med['plain_waste']:.1f}%",
            ]
        )
        print(
            f"P2 {name}: calls/batch ours {med['ours']:.1f} vs per-column {med['paper']:.1f} "
            f"({ratio:.2f}x fewer); padding waste ours {100 * med['ours_linear_waste']:.1f}% in Linear layers, "
            f"{100 * med['ours_waste']:.1f}% of attention query slots",
            flush=True,
        )
    result["table"] = md_table(
        [
            "pattern",
            "examples",
            "latents/example",
            "calls ours",
            "calls per-column",
            "per-column/ours",
            "stage lockstep calls",
            "pad waste ours, Linear/MLP",
            "pad waste ours, attention queries",
            "pad waste per-column",
            "pad waste plain CoT",
        ],
        rows,
    )
    print(result["table"])
    result["headline"] = ", ".join(
        f"{k}: {v['calls_ours']:.1f} vs {v['calls_paper']:.1f} calls, pad {100 * v['pad_waste_ours_linear']:.0f}% "
        f"(Linear) / {100 * v['pad_waste_ours_attention']:.0f}% (attention queries)"
        for k, v in result["patterns"].items()
    )
    return result


if __name__ == "__main__":
    main(run)
