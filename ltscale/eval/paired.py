"""Paired comparison of two methods scored on the same problems, over one or more training seeds.

Why paired: two methods evaluated on the same held-out problems share the problems' difficulty, so
the difference of their accuracies varies much less than either accuracy; comparing two means with
their own standard errors would throw that away. Why over problems: the held-out set is a sample
of the generator's problems, and the bootstrap asks how much the difference would move with
another sample of the same size.

Definitions (``docs/study.md`` states them for the study):

* per seed ``s``: ``Δ_s = acc_s(method) - acc_s(reference)``, both over the same problems;
* the reported difference ``Δ = mean_s Δ_s`` = the mean over problems of
  ``d_i = mean_s (correct_s,i(method) - correct_s,i(reference))``;
* its 95% interval: percentile bootstrap over problems -- draw ``N`` problem indices with
  replacement (the same draw for every seed, which keeps the pairing), average ``d`` over them,
  repeat ``resamples`` times, take the 2.5th and 97.5th percentiles (numpy's default linear
  interpolation). The generator is ``numpy.random.default_rng(seed)``: a fixed seed gives the same
  interval on every machine with the same numpy.

The interval covers problem sampling only, conditional on the trained seeds; how much the
difference moves from one training seed to the next is what the per-seed ``Δ_s`` show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "PairedResult", "paired_bootstrap"]

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class PairedResult:
    """Accuracy difference ``method - reference`` (fractions, not percent)."""

    diff: float  # mean over seeds of the per-seed accuracy differences
    ci_low: float
    ci_high: float
    per_seed: tuple[float, ...]  # Δ_s in the order the seeds were given
    n_problems: int
    resamples: int
    seed: int


def _matrix(runs: Sequence[Sequence[float]], what: str) -> np.ndarray:
    rows = [np.asarray(r, dtype=np.float64) for r in runs]
    if not rows:
        raise ValueError(f"paired_bootstrap: no {what} runs")
    n = {len(r) for r in rows}
    if len(n) != 1:
        raise ValueError(f"paired_bootstrap: {what} runs score different numbers of problems ({sorted(n)})")
    m = np.stack(rows)
    if not np.all((m == 0) | (m == 1)):
        raise ValueError(f"paired_bootstrap: {what} correctness must be 0/1 per problem")
    return m


def paired_bootstrap(
    method: Sequence[Sequence[float]],
    reference: Sequence[Sequence[float]],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> PairedResult:
    """Paired difference ``method - reference`` (see the module docstring).

    ``method[s][i]`` / ``reference[s][i]``: 1 if seed ``s`` answered problem ``i`` right. Both must
    list the same seeds in the same order and the same problems in the same order (the caller
    checks problem ids).
    """
    a = _matrix(method, "method")
    b = _matrix(reference, "reference")
    if a.shape != b.shape:
        raise ValueError(
            f"paired_bootstrap: method {a.shape} and reference {b.shape} differ (seeds x problems)"
        )
    if resamples < 1:
        raise ValueError(f"paired_bootstrap: resamples must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"paired_bootstrap: level must be in (0, 1), got {level}")
    n = a.shape[1]
    if n == 0:
        raise ValueError("paired_bootstrap: no problems")
    d = (a - b).mean(axis=0)  # per problem, averaged over seeds
    per_seed = tuple(float(x) for x in (a.mean(axis=1) - b.mean(axis=1)))
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // n)  # bounded memory: at most ~16 MB of indices at a time
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = d[idx].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return PairedResult(
        diff=float(d.mean()),
        ci_low=float(low),
        ci_high=float(high),
        per_seed=per_seed,
        n_problems=n,
        resamples=resamples,
        seed=seed,
    )
