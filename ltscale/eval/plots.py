"""Figures of the analyses (matplotlib, Agg backend): PCA of latent steps, difficulty bars, curves.

Kept apart from ``analysis.py`` so the numbers never need matplotlib. Every function returns a
``Figure``; callers log it (``Monitor.figure`` closes it) or save it (:func:`save_figures`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["difficulty_figure", "entropy_attention_figure", "pca_figure", "save_figures"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display on training nodes
    import matplotlib.pyplot as plt

    return plt


def _panel_steps(steps: list[int], max_panels: int = 4) -> list[int]:
    """Up to ``max_panels`` steps spread over the range (the paper shows steps 1, 3, 4, 6 of 6)."""
    if len(steps) <= max_panels:
        return steps
    picks = {steps[round(i * (len(steps) - 1) / (max_panels - 1))] for i in range(max_panels)}
    return sorted(picks)


def pca_figure(steps: dict[int, torch.Tensor], *, title: str = "latent steps") -> Any:
    """One panel per latent step: its vectors projected on the top-2 PCs fitted on all steps jointly.

    A shared projection and shared axes make spread comparable across steps: a collapsed step
    shows as a tight cluster.
    """
    plt = _plt()
    ks = _panel_steps(sorted(steps))
    allv = torch.cat([steps[k].to(torch.float64) for k in ks])
    mean = allv.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(allv - mean, full_matrices=False)
    basis = vh[:2].T if vh.shape[0] >= 2 else torch.cat([vh[:1].T, torch.zeros_like(vh[:1].T)], dim=1)
    proj = {k: ((steps[k].to(torch.float64) - mean) @ basis).numpy() for k in ks}
    pts = torch.cat([torch.as_tensor(p) for p in proj.values()])
    lo, hi = pts.min(dim=0).values.numpy(), pts.max(dim=0).values.numpy()
    pad = 0.05 * (hi - lo) + 1e-9
    fig, axes = plt.subplots(1, len(ks), figsize=(3.2 * len(ks), 3.2), squeeze=False)
    for ax, k in zip(axes[0], ks):
        p = proj[k]
        ax.scatter(p[:, 0], p[:, 1], s=12, alpha=0.8)
        ax.set_title(f"step {k} (n={p.shape[0]})")
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_xlabel("PC1")
    axes[0][0].set_ylabel("PC2")
    fig.suptitle(f"PCA of fed latent embeddings: {title}")
    fig.tight_layout()
    return fig


def difficulty_figure(difficulty: dict[str, Any]) -> Any:
    """Mean latent tokens per difficulty (number of gold steps), with counts and Spearman in the title."""
    plt = _plt()
    by = difficulty.get("by_difficulty", {})
    ds = sorted(int(d) for d in by)
    means = [by[d]["mean_latent"] if d in by else by[str(d)]["mean_latent"] for d in ds]
    counts = [by[d]["n"] if d in by else by[str(d)]["n"] for d in ds]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bars = ax.bar(range(len(ds)), means, color="tab:red", alpha=0.8, tick_label=[str(d) for d in ds])
    for b, n in zip(bars, counts):
        ax.annotate(
            f"n={n}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7
        )
    rho = difficulty.get("spearman")
    ax.set_title(
        f"latent tokens vs difficulty (Spearman {rho:.3f})"
        if rho is not None
        else "latent tokens vs difficulty"
    )
    ax.set_xlabel("difficulty (gold steps)")
    ax.set_ylabel("mean <thinking> tokens")
    fig.tight_layout()
    return fig


def entropy_attention_figure(curves: dict[str, list[float]]) -> Any:
    """Two stacked curves over generation steps: next-token entropy, attention mass on latent slots."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6, 4.5), sharex=True)
    xs = list(range(len(curves["entropy"])))
    a1.plot(xs, curves["entropy"], color="tab:blue")
    a1.set_ylabel("entropy (nats)")
    a2.plot(xs, curves["attn_to_latent"], color="tab:red")
    a2.set_ylabel("attention to <thinking>")
    a2.set_xlabel("generation step")
    fig.suptitle("mean over samples still generating")
    fig.tight_layout()
    return fig


def save_figures(figures: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``<name>.png`` for each figure and close it."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
