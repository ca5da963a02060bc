"""``ltscale compare`` results: the one small JSON per (seed, method) and the report rendered from them.

A result (``<out>/results/seed<k>/<method>.json``; the repository keeps the study's under
``results/study/``) holds what a table needs and nothing heavy: the eval summary, per-problem
correctness and latent / generated token counts (columns, in the held-out set's order, with the
problem ids that make a paired comparison checkable), the collapse and difficulty analyses, the
stages it trained and which commit, command and CPU produced it. ``ltscale report`` re-renders
every table from these files without a checkpoint: one row per method with mean ± sample std over
seeds, the paired comparison of every method with a reference method (LT-Tuning) over the same
problems (``ltscale.eval.paired``), and accuracy / latent tokens by difficulty.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ltscale.eval.report import collapse_value, fmt_mean_std, read_json

__all__ = [
    "RESULT_FORMAT",
    "is_compare_results",
    "load_compare_results",
    "make_result",
    "provenance",
    "render_compare_report",
]

#: ``format`` of a result file; a reader refuses any other.
RESULT_FORMAT = "ltscale-compare-result/1"
_PROBLEM_COLUMNS = ("id", "difficulty", "correct", "correct_numeric", "num_latent", "num_generated")


def provenance(command: str | None, repo: Path) -> dict[str, Any]:
    """Which code (``repo``'s git commit), command and CPU produced a result."""

    def git(*args: str) -> str:
        try:
            proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return ""
        return proc.stdout.strip()

    cpu, flags = "", set()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
        flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    # the widest vector unit decides torch's CPU kernels, hence float order (docs/study.md)
    simd = next((f for f in ("avx512f", "avx2", "sse4_2") if f in flags), "")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "command": command,
        "cpu": cpu,
        "simd": simd,
        "cores": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def make_result(
    *,
    method: str,
    position: int,
    seed: int,
    starts_from: str,
    train_seconds: float,
    stages: list[dict[str, Any]],
    summary: dict[str, Any],
    per_example: Sequence[dict[str, Any]],
    analysis: dict[str, Any],
    fingerprint: str,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """One result file's content; ``position``: the method's place in the compared list (row order)."""
    problems = {c: [e[c] for e in per_example] for c in _PROBLEM_COLUMNS}
    for c in ("correct", "correct_numeric"):
        problems[c] = [int(bool(v)) for v in problems[c]]
    return {
        "format": RESULT_FORMAT,
        "method": method,
        "position": position,
        "seed": seed,
        "starts_from": starts_from,
        "train_seconds": train_seconds,
        "stages": stages,
        "summary": summary,
        "analysis": analysis,
        "problems": problems,
        "fingerprint": fingerprint,
        "provenance": provenance,
    }


def is_compare_results(path: Path | str) -> bool:
    """A compare result file, a dir of ``seed<k>/`` result dirs, or a compare ``--out`` dir."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".json" and _is_result(path)
    return any(_is_result(p) for p in _result_files(path))


def _result_files(path: Path) -> list[Path]:
    root = path / "results" if (path / "results").is_dir() else path
    return sorted(root.glob("seed*/*.json"))


def _is_result(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == RESULT_FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def load_compare_results(path: Path | str) -> list[dict[str, Any]]:
    """Every compare result under ``path`` (see :func:`is_compare_results`), each with ``file``."""
    path = Path(path)
    files = [path] if path.is_file() else _result_files(path)
    out = []
    for f in files:
        d = read_json(f)
        if not isinstance(d, dict) or d.get("format") != RESULT_FORMAT:
            raise ValueError(f"{f}: not an ltscale compare result (format {RESULT_FORMAT})")
        for key in ("method", "seed", "summary", "problems"):
            if key not in d:
                raise ValueError(f"{f}: compare result without {key!r}")
        out.append({**d, "file": str(f)})
    if not out:
        raise ValueError(f"{path}: no ltscale compare results (seed<k>/<method>.json)")
    return out


def _pm(xs: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    return fmt_mean_std([x for x in xs if x is not None], scale, digits)


def _probe(r: dict[str, Any], which: str) -> float | None:
    return collapse_value(r.get("analysis") or {}, which, ("probe_collapse",))


def _by_method(results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: (r.get("position", 0), r["method"], r["seed"])):
        groups.setdefault(r["method"], []).append(r)
    return groups


def _summary_table(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    head = [
        "method",
        "starts from",
        "seeds",
        "accuracy (%)",
        "numeric acc. (%)",
        "mean latent tokens",
        "mean generated tokens",
        "probe cos (step 1 / last)",
        "eff. rank (last)",
        "difficulty ρ",
        "train time (s)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---", ":---", ":---"] + ["---:"] * 8) + "|"]
    for m, rs in groups.items():
        s = [r["summary"] for r in rs]
        first = _pm([_probe(r, "cos_first") for r in rs], digits=3)
        last = _pm([_probe(r, "cos_last") for r in rs], digits=3)
        rho = [((r.get("analysis") or {}).get("difficulty") or {}).get("spearman") for r in rs]
        lines.append(
            "| "
            + " | ".join(
                [
                    m,
                    rs[0].get("starts_from", "-"),
                    ", ".join(str(r["seed"]) for r in rs),
                    _pm([x["accuracy_official"] for x in s], 100.0),
                    _pm([x["accuracy_numeric"] for x in s], 100.0),
                    _pm([x["mean_latent_tokens"] for x in s]),
                    _pm([x["mean_generated_tokens"] for x in s], digits=1),
                    "-" if first == "-" else f"{first} / {last}",
                    _pm([_probe(r, "rank_last") for r in rs]),
                    _pm(rho, digits=3),
                    _pm([r.get("train_seconds") for r in rs], digits=0),
                ]
            )
            + " |"
        )
    return lines


def _paired_table(
    groups: dict[str, list[dict[str, Any]]], reference: str, resamples: int, seed: int
) -> list[str]:
    from ltscale.eval.paired import paired_bootstrap  # noqa: PLC0415 - numpy, only for this table

    ref = {r["seed"]: r for r in groups[reference]}
    head = [
        f"method − {reference}",
        "Δ accuracy (points)",
        "95% CI (paired bootstrap over problems)",
        "per-seed Δ (seed: points)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|:---|---:|---:|:---|"]
    for m, rs in groups.items():
        if m == reference:
            continue
        pairs = [(r, ref[r["seed"]]) for r in rs if r["seed"] in ref]
        if not pairs:
            lines.append(f"| {m} | - | - | no seed in common with {reference} |")
            continue
        for a, b in pairs:
            if a["problems"]["id"] != b["problems"]["id"]:
                raise ValueError(
                    f"{a['file']} and {b['file']}: not scored on the same problems; "
                    "a paired comparison needs the same held-out set"
                )
        p = paired_bootstrap(
            [a["problems"]["correct"] for a, _ in pairs],
            [b["problems"]["correct"] for _, b in pairs],
            resamples=resamples,
            seed=seed,
        )
        per_seed = ", ".join(f"{a['seed']}: {100 * d:+.1f}" for (a, _), d in zip(pairs, p.per_seed))
        lines.append(
            f"| {m} | {100 * p.diff:+.2f} | [{100 * p.ci_low:+.2f}, {100 * p.ci_high:+.2f}] | {per_seed} |"
        )
    return lines


def _difficulty_table(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    levels = sorted(
        {int(k) for rs in groups.values() for r in rs for k in r["summary"].get("by_difficulty", {})}
    )
    if not levels:
        return []
    head = ["method"] + [f"{k} step{'s' if k > 1 else ''}: acc. % / latent" for k in levels]
    lines = ["| " + " | ".join(head) + " |", "|:---|" + "---:|" * len(levels)]
    for m, rs in groups.items():
        cells = [m]
        for k in levels:
            rows = [
                r["summary"]["by_difficulty"].get(str(k)) or r["summary"]["by_difficulty"].get(k) for r in rs
            ]
            rows = [x for x in rows if x]
            if not rows:
                cells.append("-")
                continue
            acc = sum(x["accuracy"] for x in rows) / len(rows)
            lat = sum(x["mean_latent"] for x in rows) / len(rows)
            cells.append(f"{100 * acc:.1f} / {lat:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    counts = next(iter(groups.values()))[0]["summary"]["by_difficulty"]
    lines += [
        "",
        "Problems per difficulty: "
        + ", ".join(
            f"{k} steps: {int((counts.get(str(k)) or counts.get(k) or {}).get('n', 0))}" for k in levels
        )
        + ".",
    ]
    return lines


def render_compare_report(
    results: Sequence[dict[str, Any]],
    *,
    reference: str = "lt_tuning",
    resamples: int | None = None,
    bootstrap_seed: int | None = None,
) -> str:
    """Markdown: methods (mean ± std over seeds), paired differences with ``reference``,
    accuracy and latent tokens by difficulty, then where the numbers came from."""
    from ltscale.eval.paired import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED  # noqa: PLC0415

    resamples = BOOTSTRAP_RESAMPLES if resamples is None else resamples
    bootstrap_seed = BOOTSTRAP_SEED if bootstrap_seed is None else bootstrap_seed
    groups = _by_method(results)
    ns = sorted({len(r["problems"]["id"]) for r in results})
    lines = _summary_table(groups)
    lines += [
        "",
        f"Accuracy: official (text after the last '#', exact match), in %, on {'/'.join(map(str, ns))} "
        "held-out problems; mean ± sample std over seeds (one value: one seed). Probe cos / eff. rank: "
        "latents forced right after the prompt (mean pairwise cosine at probe step 1 / the last step, "
        "effective rank at the last; '-': no latent rollout); ρ: Spearman correlation of latent tokens "
        "with the number of gold steps over all problems; train time: each run's wall time (shared box).",
    ]
    if reference in groups and len(groups) > 1:
        lines += [
            "",
            *_paired_table(groups, reference, resamples, bootstrap_seed),
            "",
            f"Δ = mean over seeds of (accuracy of the method − accuracy of {reference}) on the same "
            f"problems; the interval: {resamples} paired bootstrap resamples of the problems (the same "
            f"draw for every seed; numpy default_rng({bootstrap_seed}), percentiles 2.5/97.5). It covers "
            "the choice of problems, not of training seeds: the per-seed Δ show that spread.",
        ]
    diff = _difficulty_table(groups)
    if diff:
        lines += [
            "",
            "Accuracy (%) / mean latent tokens by the number of gold steps (mean over seeds):",
            "",
            *diff,
        ]
    prov = {json.dumps(r.get("provenance") or {}, sort_keys=True) for r in results}
    lines += ["", "Produced by:"]
    for p in sorted(
        map(json.loads, prov), key=lambda p: (p.get("date") or "", json.dumps(p, sort_keys=True))
    ):
        dirty = " (uncommitted changes)" if p.get("dirty") else ""
        lines.append(
            f"- commit {p.get('commit') or '?'}{dirty}, `{p.get('command') or '?'}`, "
            f"{p.get('cpu') or '?'} ({p.get('cores') or '?'} cores{', ' + p['simd'] if p.get('simd') else ''}), "
            f"{p.get('date') or '?'}"
        )
    return "\n".join(lines) + "\n"
