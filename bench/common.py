"""Shared pieces of the CPU benchmarks: model shapes, latent layouts, interleaved timing, results.

Why interleaved: the benchmark box is shared (2 cores, several people), so absolute times drift by
2x within a minute. Every benchmark runs its compared variants in alternating order inside one
repetition loop and reports medians and the median of per-repetition (paired) ratios; only the
ratios are meant to be read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ltscale.model import LatentLM  # noqa: E402

# SmolLM2-135M's architecture (HuggingFaceTB/SmolLM2-135M config.json), random init, no download.
SMOL_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
SMOL_VOCAB = 49152
TINY_VOCAB = 200  # configs/tiny.yaml tokenizer_vocab_size


def tiny_shape() -> dict:
    """The ``model.init`` block of configs/tiny.yaml, so the bench follows the default run."""
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    return dict(cfg["model"]["init"])


@dataclass
class ModelSpec:
    name: str
    shape: dict
    vocab: int  # text vocabulary; <thinking> is appended as id ``vocab``

    @property
    def thinking_id(self) -> int:
        return self.vocab


def spec(name: str) -> ModelSpec:
    if name == "tiny":
        return ModelSpec("tiny", tiny_shape(), TINY_VOCAB)
    if name == "smol":
        return ModelSpec("smol", dict(SMOL_SHAPE), SMOL_VOCAB)
    if name == "micro":  # smoke-test size
        return ModelSpec(
            "micro",
            dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
            ),
            60,
        )
    raise ValueError(f"unknown model spec {name!r} (tiny | smol | micro)")


def build_lm(
    ms: ModelSpec,
    mode: str = "fusion",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
) -> LatentLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**ms.shape, vocab_size=ms.vocab + 1, attn_implementation="sdpa")
    base = LlamaForCausalLM(cfg).to(dtype)
    return LatentLM(base, ms.thinking_id, mode=mode, gradient_checkpointing=gradient_checkpointing)


# ---------------------------------------------------------------------------------------------- data
def paper_like_sites(
    n_latents: int, lo: int, hi: int, gen: torch.Generator, double_p: float = 0.2
) -> list[int]:
    """Insertion sites in ``[lo, hi)`` holding exactly ``n_latents`` ``<thinking>`` tokens.

    Drawn like the paper's stage-3 insertion (spec 4.2): distinct sites uniformly without
    replacement in the response, each doubled (two consecutive latents) with probability 0.2.
    """
    perm = torch.randperm(hi - lo, generator=gen).tolist()
    sites: list[int] = []
    for p in perm:
        if len(sites) >= n_latents:
            break
        sites.append(lo + p)
        if len(sites) < n_latents and float(torch.rand((), generator=gen)) < double_p:
            sites.append(lo + p)
    return sorted(sites)


def insert_latents(tokens: list[int], sites: list[int], thinking_id: int) -> list[int]:
    """``tokens`` with one ``<thinking>`` before original position ``t`` per occurrence of ``t`` in ``sites``."""
    out: list[int] = []
    counts: dict[int, int] = {}
    for s in sites:
        counts[s] = counts.get(s, 0) + 1
    for t, tok in enumerate(tokens):
        out.extend([thinking_id] * counts.get(t, 0))
        out.append(tok)
    return out


def make_batch(
    ms: ModelSpec, batch: int, length: int, n_latents: int, *, seed: int = 0, prompt_frac: float = 0.35
) -> dict[str, torch.Tensor]:
    """Right-padded batch of ragged rows (text lengths in [0.7, 1.0] x ``length``), ``n_latents``
    latents per row in the response part; labels mask the prompt (HF convention: -100)."""
    gen = torch.Generator().manual_seed(seed)
    rows, prompts = [], []
    for _ in range(batch):
        n = int(length * (0.7 + 0.3 * float(torch.rand((), generator=gen))))
        toks = torch.randint(0, ms.vocab, (n,), generator=gen).tolist()
        plen = max(2, int(n * prompt_frac))
        sites = paper_like_sites(n_latents, plen, n, gen) if n_latents else []
        rows.append(insert_latents(toks, sites, ms.thinking_id))
        prompts.append(plen)
    width = max(len(r) for r in rows)
    ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
        labels[b, prompts[b] : len(r)] = ids[b, prompts[b] : len(r)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------------------------- timing
def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant; variants alternate inside every repetition, the order
    rotating each time, so drift of a shared machine hits all variants alike."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repetitions of ``num/den`` measured in the same repetition."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def machine() -> str:
    return (
        f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, threads={torch.get_num_threads()}"
    )


def emit(result: dict) -> dict:
    """Print the result as JSON and write it where run_all.py asked (``LTSCALE_BENCH_JSON``)."""
    text = json.dumps(result, indent=1, default=str)
    print(text, flush=True)
    out = os.environ.get("LTSCALE_BENCH_JSON")
    if out:
        Path(out).write_text(text)
    return result


def main(run: Callable[[str], dict], *, one_thread: bool = True) -> None:
    """A benchmark script's entry point: ``--size full|smoke`` (``run``'s argument), the result through
    :func:`emit`. ``one_thread``: one intra-op thread, as the ratios in RESULTS.md were measured."""
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="full", choices=["full", "smoke"])
    size = p.parse_args().size
    if one_thread:
        torch.set_num_threads(1)
    emit(run(size))


def md_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
