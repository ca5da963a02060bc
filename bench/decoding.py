"""P3: batched latent decoding throughput (``generate_batched``) vs HF ``generate()`` and vs a
batch-1 loop shaped like the paper's evaluator.

Model: the tiny stage-3 (fusion) checkpoint ``runs/tiny/stage3/hf`` written by ``make run`` when it
exists (it really emits ``<thinking>`` steps and stops at EOS at different lengths), else a
random-init tiny model (never stops early, rarely thinks). Prompts: 32 synthetic test questions
(prompt part of the formatted sequence), left-padded for every batched variant.

Variants, each decoding the same 32 prompts greedily, ``max_new_tokens=96`` (configs/tiny.yaml):

* ``ours``: ``generate_batched`` in the model's latent mode, batch 1 / 8 / 32.
* ``ours_explicit``: the same with ``without_thinking=True`` (no latent steps).
* ``hf``: ``base.generate()`` explicit decoding with ``<thinking>`` suppressed, same batch sizes. It
  produces the same tokens as ``ours_explicit`` (reported), so tokens/s compare like for like.
* ``paper_loop``: one prompt at a time through the HF model with its KV cache, argmax, the latent
  function on a ``<thinking>`` step (docs/method.md §9). A cache is the generous reading;
  the product's cacheless reference (``reference_generate``) would be slower still.

Continuous batching: 96 prompts (the first 32 are the ones above) decoded with 32 rows in flight,
``generate_many`` (a finished row's slot takes the next prompt; what ``ltscale eval`` runs) vs
fixed batches of 32 through ``generate_batched`` vs the batch-1 loop, all asserted to emit the same
tokens. With fixed batches every batch runs until its longest answer ends.

tokens/s counts generated tokens up to and including EOS (latent steps count as tokens). Variants
alternate inside each repetition; ratios are medians of same-repetition ratios.

Run: ``.venv/bin/python bench/decoding.py``
"""

from __future__ import annotations

import torch
from common import ROOT, build_lm, interleaved, main, md_table, median, paired_ratio, spec
from transformers import DynamicCache

from ltscale.data import encode_records, synthetic_splits
from ltscale.model.generation import generate_batched, generate_many


def load_model(size: str, n_prompts: int = 32):
    ckpt = ROOT / "runs" / "tiny" / "stage3" / "hf"
    if size != "smoke" and (ckpt / "ltscale_latent.json").is_file():
        from ltscale.model.io import load_latent_model

        lm, tok = load_latent_model(ckpt)
        _, test = synthetic_splits(10, n_prompts, 4321, min_steps=1, max_steps=5, max_value=30, max_operand=9)
        prompts = [
            e.input_ids[: e.prompt_len] for e in encode_records(tok, test, max_length=512, strict=False)
        ]
        return (
            lm.eval(),
            prompts,
            tok.eos_token_id,
            tok.pad_token_id,
            f"trained tiny stage-3 ({ckpt.relative_to(ROOT)})",
        )
    ms = spec("tiny" if size != "smoke" else "micro")
    lm = build_lm(ms, "fusion").eval()
    g = torch.Generator().manual_seed(0)
    n = n_prompts if size != "smoke" else 4
    prompts = [
        torch.randint(3, ms.vocab, (int(torch.randint(20, 41, (), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]
    return lm, prompts, 2, 0, "random-init tiny model"


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    return ids, mask


def trim(seq: torch.Tensor, eos: int) -> list[int]:
    out = []
    for t in seq.tolist():
        out.append(t)
        if t == eos:
            break
    return out


@torch.no_grad()
def paper_loop(lm, prompts: list[list[int]], max_new: int, eos: int) -> list[list[int]]:
    """Batch size 1, greedy, KV cache; a ``<thinking>`` argmax feeds the latent function's output.

    The logits are the model's head (``lm.lm_head``): padded vocabulary rows masked, as the paper's
    model has none. The HF model's raw ``.logits`` give padded rows a logit of 0, which a weakly
    trained model's uncertain steps turn into real probability in the fusion's top-p set."""
    outs = []
    for p in prompts:
        cache = DynamicCache(config=lm.base.config)
        out = lm.base(input_ids=torch.tensor([p]), cache=cache, use_cache=True, output_hidden_states=True)
        gen = []
        for _ in range(max_new):
            hidden = out.hidden_states[-1][:, -1]
            logits = lm.lm_head(hidden)
            nxt = int(logits.argmax(-1))
            gen.append(nxt)
            if nxt == eos:
                break
            if nxt == lm.thinking_token_id and lm.uses_rollout:
                emb = lm.latent_input(hidden, logits)[:, None]
            else:
                emb = lm.embed(torch.tensor([[nxt]]))
            out = lm.base(inputs_embeds=emb, cache=cache, use_cache=True, output_hidden_states=True)
        outs.append(gen)
    return outs


def continuous(lm, prompts, eos: int, pad: int, max_new: int, slots: int, reps: int) -> dict:
    """More prompts than slots: fixed batches of ``slots`` (each runs until its longest answer ends)
    vs continuous batching (a finished row's slot takes the next prompt) vs the batch-1 loop."""
    produced: dict[str, list[list[int]]] = {}

    def fixed():
        seqs = []
        for s in range(0, len(prompts), slots):
            ids, mask = left_pad(prompts[s : s + slots], pad)
            out = generate_batched(lm, ids, mask, max_new, eos_token_id=eos, pad_token_id=pad)
            seqs += [trim(r, eos) for r in out.sequences]
        produced["fixed"] = seqs

    def refill():
        out = generate_many(lm, prompts, max_new, slots=slots, eos_token_id=eos, pad_token_id=pad)
        produced["continuous"] = [trim(r, eos) for r in out.sequences]

    def loop():
        produced["paper_loop"] = paper_loop(lm, prompts, max_new, eos)

    times = interleaved({"fixed": fixed, "continuous": refill, "paper_loop": loop}, reps=reps, warmup=0)
    toks = {k: sum(len(s) for s in v) for k, v in produced.items()}
    per_tok = {k: [t / toks[k] for t in times[k]] for k in times}
    res = {
        "prompts": len(prompts),
        "slots": slots,
        "tokens": toks["continuous"],
        "tokens_per_s": {k: toks[k] / median(times[k]) for k in times},
        "continuous_over_paper_loop": paired_ratio(per_tok, "paper_loop", "continuous"),
        "fixed_over_paper_loop": paired_ratio(per_tok, "paper_loop", "fixed"),
        "continuous_over_fixed": paired_ratio(per_tok, "fixed", "continuous"),
        "same_tokens": produced["continuous"] == produced["paper_loop"] == produced["fixed"],
    }
    tps = res["tokens_per_s"]
    res["table"] = md_table(
        ["prompts", "slots", "continuous tok/s", "fixed batches tok/s", "paper loop tok/s",
         "continuous / paper loop", "fixed / paper loop", "continuous / fixed", "same tokens"],
        [[len(prompts), slots, tps["continuous"], tps["fixed"], tps["paper_loop"],
          res["continuous_over_paper_loop"], res["fixed_over_paper_loop"], res["continuous_over_fixed"],
          "yes" if res["same_tokens"] else "no"]],
    )
    print(f"P3 continuous batching, {len(prompts)} prompts / {slots} slots: "
          f"{res['continuous_over_paper_loop']:.1f}x the batch-1 loop, {res['continuous_over_fixed']:.2f}x fixed batches",
          flush=True)
    print(res["table"])
    return res


def run(size: str = "full") -> dict:
    lm, prompts_all, eos, pad, source = load_model(size, n_prompts=96 if size == "full" else 4)
    prompts = prompts_all[:32]
    max_new = 96 if size == "full" else 6
    reps = 2 if size == "full" else 1
    sizes = (1, 8, 32) if size == "full" else (1, 4)
    think = lm.thinking_token_id
    produced: dict[str, list[list[int]]] = {}

    def ours(bs: int, explicit: bool):
        def f():
            seqs = []
            for s in range(0, len(prompts), bs):
                ids, mask = left_pad(prompts[s : s + bs], pad)
                out = generate_batched(
                    lm, ids, mask, max_new, eos_token_id=eos, pad_token_id=pad, without_thinking=explicit
                )
                seqs += [trim(r, eos) for r in out.sequences]
            produced[f"ours{'_explicit' if explicit else ''}_b{bs}"] = seqs

        return f

    def hf(bs: int):
        def f():
            seqs = []
            for s in range(0, len(prompts), bs):
                ids, mask = left_pad(prompts[s : s + bs], pad)
                out = lm.base.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    suppress_tokens=[think],
                )
                seqs += [trim(r, eos) for r in out[:, ids.shape[1] :]]
            produced[f"hf_b{bs}"] = seqs

        return f

    def loop():
        produced["paper_loop"] = paper_loop(lm, prompts, max_new, eos)

    fns = {}
    for bs in sizes:
        fns[f"ours_b{bs}"] = ours(bs, False)
        fns[f"ours_explicit_b{bs}"] = ours(bs, True)
        fns[f"hf_b{bs}"] = hf(bs)
    fns["paper_loop"] = loop
    times = interleaved(fns, reps=reps, warmup=0)
    toks = {k: sum(len(s) for s in v) for k, v in produced.items()}
    tps = {k: toks[k] / median(times[k]) for k in fns}
    big = max(sizes)
    rows = []
    res = {
        "bench": "P3 decoding",
        "model": source,
        "prompts": len(prompts),
        "max_new_tokens": max_new,
        "reps": reps,
        "tokens": toks,
        "tokens_per_s": tps,
        "latent_steps_ours": sum(s.count(think) for s in produced[f"ours_b{big}"]),
    }
    for bs in sizes:
        r_hf = paired_ratio(
            {
                "a": [t / toks[f"ours_explicit_b{bs}"] for t in times[f"ours_explicit_b{bs}"]],
                "b": [t / toks[f"hf_b{bs}"] for t in times[f"hf_b{bs}"]],
            },
            "b",
            "a",
        )
        r_hf_latent = paired_ratio(
            {
                "a": [t / toks[f"ours_b{bs}"] for t in times[f"ours_b{bs}"]],
                "b": [t / toks[f"hf_b{bs}"] for t in times[f"hf_b{bs}"]],
            },
            "b",
            "a",
        )
        r_loop = paired_ratio(
            {
                "a": [t / toks[f"ours_b{bs}"] for t in times[f"ours_b{bs}"]],
                "b": [t / toks["paper_loop"] for t in times["paper_loop"]],
            },
            "b",
            "a",
        )
        same = produced[f"ours_explicit_b{bs}"] == produced[f"hf_b{bs}"]
        res[f"b{bs}"] = {
            "ours_over_hf_explicit": r_hf,
            "ours_latent_over_hf": r_hf_latent,
            "ours_over_paper_loop": r_loop,
            "explicit_tokens_identical_to_hf": same,
            "latent_tokens_identical_to_paper_loop": produced[f"ours_b{bs}"] == produced["paper_loop"],
        }
        rows.append(
            [
                bs,
                tps[f"ours_b{bs}"],
                tps[f"ours_explicit_b{bs}"],
                tps[f"hf_b{bs}"],
                r_hf,
                r_hf_latent,
                r_loop,
                "yes" if same else "no",
            ]
        )
        print(
            f"P3 batch {bs}: ours {tps[f'ours_b{bs}']:.0f} tok/s; ours explicit / HF generate {r_hf:.2f}x; "
            f"ours latent / batch-1 paper loop {r_loop:.1f}x",
            flush=True,
        )
    res["table"] = md_table(
        [
            "batch",
            "ours latent tok/s",
            "ours explicit tok/s",
            "HF generate tok/s",
            "ours explicit / HF",
            "ours latent / HF",
            "ours latent / paper batch-1 loop",
            "same tokens as HF",
        ],
        rows,
    )
    res["paper_loop_tokens_per_s"] = tps["paper_loop"]
    print(res["table"])
    cb = continuous(lm, prompts_all, eos, pad, max_new, slots=big, reps=reps)
    res["continuous"] = cb
    res["table"] += "\n\n" + cb["table"]
    res["headline"] = (
        f"b{big}: {res[f'b{big}']['ours_over_hf_explicit']:.2f}x HF, "
        f"{res[f'b{big}']['ours_over_paper_loop']:.1f}x batch-1 loop (fixed batch); continuous batching "
        f"{cb['prompts']} prompts / {cb['slots']} slots: {cb['continuous_over_paper_loop']:.1f}x"
    )
    return res


if __name__ == "__main__":
    main(run)
