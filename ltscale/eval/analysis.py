"""The paper's three analyses as numbers (docs/method.md §10.2-10.4): difficulty, entropy/attention, collapse.

* **Latent tokens vs difficulty.** Difficulty = number of gold reasoning steps (the data's
  ``steps``; the paper's own definition is not known, docs/method.md §10.2). Reported per difficulty
  (count, mean latent tokens) and as a Spearman rank correlation over examples (ties get average
  ranks, so it is the Pearson correlation of the rank vectors). Computed from eval per-example
  dicts, so it needs no extra generation.
* **Entropy and attention over generation steps.** An instrumented greedy decoder (batch 1,
  eager attention) records, for each generated token ``t``: the entropy (nats) of the next-token
  distribution that chose it, and the fraction of attention mass that the query producing those
  logits puts on latent (``<thinking>``) key positions, averaged over layers and heads.
* **Feature collapse.** For latent step ``k`` (the k-th latent slot of a sample), the embeddings
  fed at that step across samples, summarised by: mean pairwise cosine similarity (1 = every
  sample feeds the same direction), effective rank (exp of the entropy of the normalised singular
  values of the *uncentred* matrix; 1 = all vectors on one line) and the explained-variance
  ratio of the first principal component (of the centred matrix; 1 = one direction of variation).
  Two sources: the latents the model *generates* (a step counts once at least two samples reached
  it) and a **probe** that forces ``probe_steps`` consecutive latent steps right after the prompt
  (Coconut's fixed-latent setting), which exists for every sample and every hidden/fusion
  checkpoint, so runs and methods are comparable even when a model rarely emits ``<thinking>``.

The instrumented decoder mirrors :func:`ltscale.model.generation.generate_batched` step for step
(same latent function, same greedy rule); a unit test checks they produce the same tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ltscale.data import formatting
from ltscale.model.device import to_device

__all__ = [
    "AnalysisResult",
    "Trace",
    "collapse_metrics",
    "difficulty_analysis",
    "entropy_attention_curves",
    "run_analysis",
    "spearman",
    "trace_generation",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ statistics


def _ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks with ties sharing their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation; ``None`` when undefined (fewer than 2 points or a constant side)."""
    if len(x) != len(y):
        raise ValueError(f"spearman: lengths differ ({len(x)} vs {len(y)})")
    if len(x) < 2:
        return None
    rx, ry = _ranks(list(x)), _ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)


def collapse_metrics(vectors: torch.Tensor) -> dict[str, float] | None:
    """Collapse numbers of ``n`` vectors ``(n, d)``: mean pairwise cosine, effective rank, PC1 share.

    ``None`` for fewer than two vectors. Zero vectors count as cosine 0 with everything. When the
    vectors do not vary at all (identical), the PC1 share is defined as 1 (total collapse).
    """
    x = torch.as_tensor(vectors).detach().to(torch.float64).cpu()
    if x.ndim != 2:
        raise ValueError(f"collapse_metrics: expected (n, d), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n < 2:
        return None
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gram = unit @ unit.T
    mean_cos = float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))
    s = torch.linalg.svdvals(x)
    total = float(s.sum())
    if total <= 0:
        eff_rank = 0.0
    else:
        p = s / s.sum()
        p = p[p > 0]
        eff_rank = float(torch.exp(-(p * p.log()).sum()))
    centred = x - x.mean(dim=0, keepdim=True)
    var = torch.linalg.svdvals(centred) ** 2
    scale = float((x**2).sum()) or 1.0
    pc1 = float(var[0] / var.sum()) if float(var.sum()) > 1e-12 * scale else 1.0
    return {"mean_cos": mean_cos, "effective_rank": eff_rank, "pc1_explained": pc1, "n": n}


def difficulty_analysis(
    examples: Sequence[dict[str, Any]], *, difficulty_key: str = "difficulty", latent_key: str = "num_latent"
) -> dict[str, Any]:
    """Latent tokens per difficulty and their Spearman correlation over examples.

    ``examples``: eval per-example dicts (or anything with those two keys).
    """
    xs = [float(e[difficulty_key]) for e in examples]
    ys = [float(e[latent_key]) for e in examples]
    groups: dict[int, list[float]] = {}
    for d, y in zip(xs, ys):
        groups.setdefault(int(d), []).append(y)
    return {
        "n": len(xs),
        "spearman": spearman(xs, ys),
        "by_difficulty": {
            d: {"n": len(v), "mean_latent": sum(v) / len(v)} for d, v in sorted(groups.items())
        },
    }


# ------------------------------------------------------------------------- instrumented decoding


@dataclass
class Trace:
    """One sample's instrumented greedy generation."""

    tokens: list[int] = field(default_factory=list)
    is_latent: list[bool] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    attn_to_latent: list[float] = field(default_factory=list)  # empty when attention was not recorded
    latent_inputs: list[torch.Tensor] = field(default_factory=list)  # the k-th fed latent embedding

    @property
    def num_latent(self) -> int:
        return sum(self.is_latent)


def _entropy(logits: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    return float(-(logp.exp() * logp).sum())


def _attn_fraction(attentions: Sequence[torch.Tensor] | None, latent_keys: torch.Tensor) -> float:
    """Mean over layers and heads of the last query's attention mass on ``latent_keys`` (bool, K)."""
    if not attentions:
        return float("nan")
    fracs = []
    for a in attentions:  # (1, heads, q, K)
        row = a[0, :, -1, :].to(torch.float64)
        fracs.append(float(row[:, latent_keys[: row.shape[-1]]].sum(dim=-1).mean()))
    return sum(fracs) / len(fracs)


@torch.no_grad()
def trace_generation(
    lm: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    attention: bool = True,
    force_latent_steps: int = 0,
) -> Trace:
    """Greedy decode one prompt with ``lm`` (a ``LatentLM``), recording the analysis quantities.

    ``attention`` needs eager attention: the base model is switched to ``eager`` for the call and
    switched back after. ``force_latent_steps``: the first N steps are latent whatever the argmax
    (the collapse probe); it needs a mode with a latent function (hidden / fusion).
    """
    if force_latent_steps and not lm.uses_rollout:
        raise ValueError(f"force_latent_steps needs a hidden/fusion checkpoint, mode is {lm.mode!r}")
    base = lm.base
    device = next(base.parameters()).device
    previous_impl = getattr(base.config, "_attn_implementation", None)
    if attention and previous_impl != "eager":
        base.set_attn_implementation("eager")
    try:
        return _trace(lm, prompt_ids, max_new_tokens, eos_token_id, attention, force_latent_steps, device)
    finally:
        if attention and previous_impl not in (None, "eager"):
            base.set_attn_implementation(previous_impl)


def _trace(lm, prompt_ids, max_new_tokens, eos_token_id, attention, force_latent_steps, device) -> Trace:
    think = lm.thinking_token_id
    decoder = lm.decoder()
    cache = DynamicCache(config=lm.base.config)
    if not len(prompt_ids):
        raise ValueError("trace_generation: empty prompt")

    def forward(x, pos, latent_keys):
        """One cached decoder call on embeddings ``x`` at positions ``pos``: the last position's
        hidden state, its logits and (with ``attention``) the share of its attention on latent keys."""
        out = decoder(
            inputs_embeds=x, position_ids=pos, cache=cache, use_cache=True, output_attentions=attention
        )
        hidden = out.last_hidden_state[:, -1]
        logits = lm.lm_head(hidden)
        return hidden, logits, _attn_fraction(out.attentions, latent_keys) if attention else None

    ids = to_device(torch.tensor([list(prompt_ids)], dtype=torch.long), device)
    pos = torch.arange(ids.shape[1], device=device)[None]
    latent_keys = torch.zeros(ids.shape[1], dtype=torch.bool, device=device)
    hidden, logits, attn = forward(lm.embed(ids), pos, latent_keys)
    trace = Trace()
    next_pos = ids.shape[1]
    for step in range(max_new_tokens):
        nxt = int(logits[0].argmax())
        if step < force_latent_steps:
            nxt = think
        latent = nxt == think
        trace.tokens.append(nxt)
        trace.is_latent.append(latent)
        trace.entropy.append(_entropy(logits[0]))
        if attn is not None:
            trace.attn_to_latent.append(attn)
        if eos_token_id is not None and nxt == eos_token_id:
            break
        if step == max_new_tokens - 1:
            break
        # The step's host values (token, latent flag, position) reach the device together.
        step_id, step_latent, step_pos = to_device(
            (torch.tensor([nxt]), torch.tensor([latent]), torch.tensor([[next_pos]])), device
        )
        embed = lm.embed(step_id)
        if latent and lm.uses_rollout:
            embed = lm.latent_input(hidden, logits).to(embed.dtype)
            trace.latent_inputs.append(embed[0].detach().float().cpu())
        latent_keys = torch.cat([latent_keys, step_latent])
        hidden, logits, attn = forward(embed[:, None], step_pos, latent_keys)
        next_pos += 1
    return trace


# ------------------------------------------------------------------------------------ aggregation


def entropy_attention_curves(traces: Sequence[Trace]) -> dict[str, list[float]]:
    """Per generation step: mean entropy, mean attention-to-latent and the number of samples alive."""
    width = max((len(t.tokens) for t in traces), default=0)
    ent, att, alive = [], [], []
    for s in range(width):
        rows = [t for t in traces if len(t.tokens) > s]
        alive.append(len(rows))
        ent.append(sum(t.entropy[s] for t in rows) / len(rows))
        a = [t.attn_to_latent[s] for t in rows if len(t.attn_to_latent) > s]
        att.append(sum(a) / len(a) if a else float("nan"))
    return {"entropy": ent, "attn_to_latent": att, "alive": alive}


def latent_steps(traces: Sequence[Trace], max_steps: int) -> dict[int, torch.Tensor]:
    """``{k: (n_k, d)}``: the k-th fed latent embedding (1-based) of every sample that reached it."""
    out: dict[int, torch.Tensor] = {}
    for k in range(1, max_steps + 1):
        vecs = [t.latent_inputs[k - 1] for t in traces if len(t.latent_inputs) >= k]
        if vecs:
            out[k] = torch.stack(vecs)
    return out


@dataclass
class AnalysisResult:
    """Numbers (JSON-ready) plus the raw material of the figures."""

    numbers: dict[str, Any]
    curves: dict[str, list[float]]
    generated_steps: dict[int, torch.Tensor]
    probe_steps: dict[int, torch.Tensor]
    difficulty: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """:attr:`numbers` in strict JSON form: string keys, NaN as ``null``."""
        return _json_safe(self.numbers)

    def scalars(self, prefix: str = "latent") -> dict[str, float]:
        """Flat TensorBoard scalars; undefined numbers (None/NaN) are left out."""
        out: dict[str, float] = {}
        rho = self.difficulty.get("spearman")
        if rho is not None:
            out[f"{prefix}/difficulty_spearman"] = rho
        for key in ("entropy_mean", "attn_to_latent_mean", "latent_fraction"):
            v = self.numbers.get(key)
            if v is not None and math.isfinite(v):
                out[f"{prefix}/{key}"] = v
        names = {"mean_cos": "collapse_cos", "effective_rank": "effective_rank", "pc1_explained": "pc1_var"}
        for source, tag in (("collapse", ""), ("probe_collapse", "probe_")):
            for k, m in self.numbers.get(source, {}).items():
                for key, name in names.items():
                    out[f"{prefix}/{tag}{name}_step{k}"] = m[key]
        return out

    def figures(self) -> dict[str, Any]:
        """``{tag: matplotlib Figure}`` (Agg backend); the caller closes them."""
        from ltscale.eval import plots

        figs = {"difficulty": plots.difficulty_figure(self.difficulty)}
        # "pca": the latents the model generated (the paper's picture); the probe when there are none.
        if self.generated_steps:
            figs["pca"] = plots.pca_figure(self.generated_steps, title="generated latent steps")
        elif self.probe_steps:
            figs["pca"] = plots.pca_figure(self.probe_steps, title="probe (forced latent steps)")
        if self.probe_steps:
            figs["pca_probe"] = plots.pca_figure(self.probe_steps, title="probe (forced latent steps)")
        if self.curves.get("entropy"):
            figs["entropy_attention"] = plots.entropy_attention_figure(self.curves)
        return figs


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def run_analysis(
    lm: Any,
    tokenizer: Any,
    records: Sequence[Any],
    *,
    max_new_tokens: int = 128,
    probe_steps: int = 6,
    attention: bool = True,
    use_chat_template: bool | None = None,
    examples: Sequence[dict[str, Any]] | None = None,
    progress: bool = False,
) -> AnalysisResult:
    """All three analyses on ``records`` (a few dozen suffice; each is decoded alone).

    ``examples``: eval per-example dicts of a (usually larger) eval; when given, the difficulty
    analysis uses them instead of the traces here.
    """
    was_training = bool(getattr(lm, "training", False))
    lm.eval()
    traces, probes, rows = [], [], []
    try:
        for r in tqdm(records, desc="analyze", unit="problem", disable=not progress):
            ids = list(formatting.prompt_ids(tokenizer, r.question, use_chat_template=use_chat_template))
            t = trace_generation(
                lm, ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id, attention=attention
            )
            traces.append(t)
            rows.append({"difficulty": int(r.difficulty), "num_latent": t.num_latent})
            if probe_steps and lm.uses_rollout:
                # probe_steps latent embeddings are fed: the last forced step's input needs one more step
                probes.append(
                    trace_generation(
                        lm, ids, probe_steps + 1, attention=False, force_latent_steps=probe_steps
                    )
                )
    finally:
        lm.train(was_training)
    curves = entropy_attention_curves(traces)
    gen = {k: v for k, v in latent_steps(traces, max(probe_steps, 1)).items() if v.shape[0] >= 2}
    probe = latent_steps(probes, probe_steps) if probes else {}
    difficulty = difficulty_analysis(examples if examples is not None else rows)
    n_tokens = sum(len(t.tokens) for t in traces)
    entropies = [e for t in traces for e in t.entropy]
    attns = [a for t in traces for a in t.attn_to_latent if math.isfinite(a)]
    numbers: dict[str, Any] = {
        "n_traced": len(traces),
        "entropy_mean": sum(entropies) / len(entropies) if entropies else None,
        "attn_to_latent_mean": sum(attns) / len(attns) if attns else None,
        "latent_fraction": sum(t.num_latent for t in traces) / n_tokens if n_tokens else None,
        "difficulty": difficulty,
        "collapse": {k: collapse_metrics(v) for k, v in gen.items()},
        "probe_collapse": {k: m for k, v in probe.items() if (m := collapse_metrics(v)) is not None},
        "curves": curves,
    }
    return AnalysisResult(
        numbers=numbers, curves=curves, generated_steps=gen, probe_steps=probe, difficulty=difficulty
    )
