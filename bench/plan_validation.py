"""``ltscale plan`` checked against what it can be checked against on CPU (bench/RESULTS.md, "Planner").

1. Model states: the planner's per-GPU ZeRO-2 / ZeRO-3 / ZeRO-3-offload model-state bytes for the
   paper's three models on 1, 4 and 8 nodes of 8 GPUs against DeepSpeed's own estimators
   (``estimate_zero{2,3}_model_states_mem_needs``). Where they differ by design (ZeRO-3's gathered
   16-bit copy with ltscale's reuse distance vs DeepSpeed's "largest layer") the table shows both.
2. Activations: bytes saved for backward (``saved_tensors_hooks``, unique storages, parameters
   excluded) of a LatentLM forward against ``plan.activation_memory``'s saved terms.
3. Totals: peak RSS of one real training step (DeepSpeed ZeRO-3 engine, one CPU rank, fp32: forward,
   backward, optimizer step) minus the RSS before the model was built, against the planner's total
   for the same run (fp32, world 1), at the tiny and the SmolLM2-135M shapes. Each case runs in its own
   process (freed memory is not returned to the OS); the high-water mark is reset at the baseline.
   Goal: within 25 %.

Run: ``.venv/bin/python bench/plan_validation.py [--size full|smoke]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from common import ROOT, emit, make_batch, md_table, spec

from ltscale.plan import GIB, Arch, activation_memory, model_states

HERE = Path(__file__).resolve().parent
PAPER = ("Llama-3.2-1B-Instruct", "Llama-3.2-3B-Instruct", "Llama-3.1-8B-Instruct")
# (shape, rows, tokens per row, latents per row): a stage-3 micro-batch; CoT = the same rows without latents
# The first case (a 20k-parameter model) measures the runtime's fixed cost (DeepSpeed engine, oneDNN
# scratch, allocator arenas; on a GPU the CUDA context, which the planner's headroom covers).
CASES = {
    "full": [("micro", 2, 32, 4), ("tiny", 16, 256, 16), ("smol", 4, 128, 16)],
    "smoke": [("micro", 2, 32, 4)],
}


def rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Restart the kernel's RSS high-water mark here: imports before the baseline peak higher than
    the baseline itself, which would otherwise be reported as the step's peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> float:
    """``VmHWM`` (``ru_maxrss`` also keeps the high-water marks of exited threads, which a reset misses)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return max(kib * 1024.0, rss())


def arch_of(ms, rows: int) -> Arch:
    s = ms.shape
    heads = s["num_attention_heads"]
    return Arch(ms.name, s["hidden_size"], s["num_hidden_layers"], heads, s.get("num_key_value_heads", heads),
                s["hidden_size"] // heads, s["intermediate_size"], rows, bool(s.get("tie_word_embeddings")))  # fmt: skip


def _latent_lm(ms, mode: str, ckpt: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ltscale.model import LatentLM
    from ltscale.model.builder import fit_vocab

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**ms.shape, vocab_size=ms.vocab, attn_implementation="sdpa"))
    fit_vocab(base, ms.vocab + 1, 64)  # <thinking>, padded as a run pads it
    return LatentLM(base, ms.thinking_id, mode=mode, gradient_checkpointing=ckpt, fusion_impl="torch",
                    vocab_tokens=ms.vocab + 1)  # fmt: skip


def history_span(ids: torch.Tensor, mask: torch.Tensor, think: int) -> tuple[float, int, float]:
    """(``history_span``, passes, ``largest_pass``) of ``plan.activation_memory`` for this batch. Pass k
    of a row runs from its k-th latent to the token before its next one (the last to the row's end);
    a packed pass gathers every row's keys up to the longest row's extent so far."""
    lengths = mask.sum(1).tolist()
    passes = 1 + int((ids == think).sum(1).max())
    extents = []  # per row, the keys its pass k sees: up to its (k+1)-th latent, else the row's end
    for b in range(ids.shape[0]):
        pos = (ids[b] == think).nonzero().flatten().tolist()
        extents.append([(pos[k] if k < len(pos) else lengths[b]) for k in range(passes)])
    keys = sum(max(row[k] for row in extents) for k in range(passes)) * ids.shape[0] / sum(lengths)
    starts = [[0] + row[:-1] for row in extents]  # pass k of a row starts where pass k-1 ended
    sizes = [sum(e[k] - s[k] for e, s in zip(extents, starts, strict=True)) for k in range(passes)]
    return (keys - 1) / max(passes - 1, 1), passes, max(sizes) / sum(lengths)


def child(name: str, mode: str, ckpt: bool, rows: int, length: int, latents: int) -> dict:
    """One real step; prints measured and predicted bytes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import deepspeed.runtime.engine  # noqa: F401 - libraries in RSS before the baseline, not in the step
    import deepspeed.runtime.zero.stage3  # noqa: F401

    from ltscale.engine import build_engine, init_distributed, render_ds_config

    init_distributed()
    ms = spec(name)
    batch = make_batch(ms, rows, length, latents if mode == "fusion" else 0, seed=1)
    span, passes, largest = history_span(batch["input_ids"], batch["attention_mask"], ms.thinking_id)
    before = rss()
    reset_peak()
    lm = _latent_lm(ms, mode, ckpt)
    ds = render_ds_config(
        "zero3", micro_batch=rows, grad_accum=1, world_size=1, grad_clip=1.0, precision="fp32"
    )
    engine = build_engine(lm, ds_config=ds, lr=1e-4, weight_decay=0.01,
                          external_parameters=lm.zero3_external_parameters())  # fmt: skip
    engine.train()
    out = engine(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 min_passes=passes, return_logits=False)  # fmt: skip
    engine.backward(out.loss)
    engine.step()
    peak = peak_rss()
    arch = arch_of(ms, lm.base.get_input_embeddings().weight.shape[0])
    tokens = int(batch["attention_mask"].sum())
    states = model_states(arch, "zero3", 1, 4)
    acts = activation_memory(arch, b=4, rows=rows, row_tokens=round(tokens / rows), passes=passes,
                             fusion_latents=int((batch["input_ids"] == ms.thinking_id).sum()) if mode == "fusion" else 0,
                             checkpointing=ckpt, history_span=span, largest_pass=largest)  # fmt: skip
    return {"shape": name, "mode": mode, "ckpt": ckpt, "passes": passes, "tokens": tokens, "params": arch.params,
            "measured": peak - before, "states": states["total"], "activations": acts["total"],
            "predicted": states["total"] + acts["total"]}  # fmt: skip


def saved_bytes(name: str, mode: str, rows: int, length: int, latents: int) -> dict:
    """Bytes a forward saves for backward vs the planner's saved terms (no checkpointing)."""
    ms = spec(name)
    lm = _latent_lm(ms, mode, False).train()
    batch = make_batch(ms, rows, length, latents if mode == "fusion" else 0, seed=1)
    span, passes, largest = history_span(batch["input_ids"], batch["attention_mask"], ms.thinking_id)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm(**batch, min_passes=passes, return_logits=False)
    params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    measured = sum(v for k, v in seen.items() if k not in params)
    tokens = int(batch["attention_mask"].sum())
    arch = arch_of(ms, lm.base.get_input_embeddings().weight.shape[0])
    a = activation_memory(arch, b=4, rows=rows, row_tokens=round(tokens / rows), passes=passes,
                          fusion_latents=int((batch["input_ids"] == ms.thinking_id).sum()) if mode == "fusion" else 0,
                          checkpointing=False, history_span=span, largest_pass=largest)  # fmt: skip
    return {"shape": name, "mode": mode, "measured": measured, "predicted": a["layers"] + a["history"] + a["head"]
            + a["fusion"]}  # fmt: skip


def deepspeed_states() -> list[list[object]]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from transformers import AutoConfig

    from ltscale.model.builder import padded_rows

    rows = []
    for model in PAPER:
        c = AutoConfig.from_pretrained(ROOT / "tests" / "fixtures" / "paper_models" / model)
        arch = Arch(model, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                    c.head_dim, c.intermediate_size, padded_rows(c.vocab_size + 1, 64), c.tie_word_embeddings)  # fmt: skip
        largest = arch.vocab_rows * arch.hidden
        for nodes in (1, 4, 8):
            world = nodes * 8
            z2 = model_states(arch, "zero2", world, 2)
            z3 = model_states(arch, "zero3", world, 2)
            off = model_states(arch, "zero3_offload", world, 2)
            ds2 = estimate_zero2_model_states_mem_needs(arch.params, 8, nodes, cpu_offload=False)[1]
            ds3 = estimate_zero3_model_states_mem_needs(arch.params, largest, 8, nodes, cpu_offload=False)[1]
            dso = estimate_zero3_model_states_mem_needs(arch.params, largest, 8, nodes, cpu_offload=True,
                                                        cpu_offload_params=False)[1]  # fmt: skip
            ours2 = z2["params16"] + z2["grads16"] + z2["optimizer"]
            ours3 = z3["params16"] + z3["grads16"] + z3["optimizer"]
            ours_off = off["params16"] + off["grads16"]
            rows.append([model, world, f"{ours2 / GIB:.2f} / {ds2 / GIB:.2f}", f"{ours3 / GIB:.2f} / "
                         f"{(ds3 - 4 * largest) / GIB:.2f}", f"{4 * largest / GIB:.2f} vs {z3['gathered'] / GIB:.2f}",
                         f"{ours_off / GIB:.2f} / {(dso - 4 * largest) / GIB:.2f}"])  # fmt: skip
    return rows


def run(size: str) -> dict:
    results: dict = {"states": deepspeed_states() if size == "full" else [], "saved": [], "steps": []}
    for name, rows, length, latents in CASES[size]:
        for mode in ("cot", "fusion"):
            results["saved"].append(saved_bytes(name, mode, rows, length, latents))
            for ckpt in (False, True):
                cmd = [sys.executable, str(HERE / "plan_validation.py"), "--child", name, mode, str(int(ckpt)),
                       str(rows), str(length), str(latents)]  # fmt: skip
                env = {**os.environ, "OMP_NUM_THREADS": "1", "LTSCALE_BENCH_JSON": ""}
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                results["steps"].append(json.loads(out.strip().splitlines()[-1]))
    fixed = min(r["measured"] for r in results["steps"] if r["shape"] == CASES[size][0][0])
    for r in results["steps"]:
        r["net"] = r["measured"] - fixed
    checked = [r for r in results["steps"] if r["shape"] != CASES[size][0][0]] or results["steps"]
    results["fixed"] = fixed
    results["headline"] = max(abs(r["predicted"] / max(r["net"], 1) - 1) for r in checked)
    if results["states"]:
        print(md_table(["model", "GPUs", "ZeRO-2 ours / DS", "ZeRO-3 shards ours / DS",
                        "ZeRO-3 DS largest-layer vs ours gathered", "offload ours / DS"], results["states"]))  # fmt: skip
        print()
    print(md_table(["shape", "mode", "saved MB measured", "planner", "ratio"],
                   [[r["shape"], r["mode"], f"{r['measured'] / 2**20:.1f}", f"{r['predicted'] / 2**20:.1f}",
                     f"{r['predicted'] / r['measured']:.2f}"] for r in results["saved"]]))  # fmt: skip
    print()
    print(f"fixed runtime cost (smallest {CASES[size][0][0]} step): {fixed / 2**20:.0f} MB")
    print(md_table(["shape", "mode", "ckpt", "passes", "tokens", "peak MB", "- fixed", "planner (states + act.)",
                    "planner / net"],
                   [[r["shape"], r["mode"], r["ckpt"], r["passes"], r["tokens"], f"{r['measured'] / 2**20:.0f}",
                     f"{r['net'] / 2**20:.0f}",
                     f"{r['predicted'] / 2**20:.0f} ({r['states'] / 2**20:.0f} + {r['activations'] / 2**20:.0f})",
                     f"{r['predicted'] / max(r['net'], 1):.2f}"] for r in results["steps"]]))  # fmt: skip
    return emit(results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        a = sys.argv[2:]
        print(json.dumps(child(a[0], a[1], bool(int(a[2])), int(a[3]), int(a[4]), int(a[5]))))
    else:
        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("--size", choices=["full", "smoke"], default="full")
        run(parser.parse_args().size)
