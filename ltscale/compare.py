"""``ltscale compare``: every method on the tiny default, per training seed, scored on one held-out set.

Protocol (why): the methods are compared as fine-tunings of **one** CoT-SFT checkpoint per seed, as
Coconut's GSM8K recipe starts from its CoT model and LT-Tuning's stage 1 *is* CoT-SFT. So the
``cot`` run (``configs/tiny-cot.yaml``) trains first; every other training method starts from its
``stage1/hf`` export with its own latent stages only (LT-Tuning variants drop their stage 1,
Coconut starts at its stage 1, SoftCoT trains its projection on the frozen CoT model), and
Soft-Thinking decodes the CoT checkpoint without training. Train time is each run's own wall
time (set-up, steps, checkpoints, exports; no eval) -- the CoT time is listed once, in its row.
Every checkpoint is then scored by the same evaluator, in this process, with the method's own
decoding (``ltscale.inference.load_for_inference``), followed by the paper's collapse and
difficulty analyses (``ltscale.eval.analysis.run_analysis``) on the same problems.

Seeds: each seed ``k`` sets ``train.seed=k`` for every run of that seed (initialisation, sample
order, insertion draws, tokenizer training), its own CoT checkpoint included; the data and the
held-out problems stay fixed. ``heldout`` enlarges the synthetic test split without changing the
training problems (:func:`heldout_records`). ``stage_epochs`` sets the budget of every method from
LT-Tuning's three stage epochs (``Method.stage_budget``). docs/study.md is the protocol built on it.

Which config a method runs, what it keeps of it when it starts from the CoT checkpoint and
whether it trains at all are the method's hooks (``Method.tiny_config``, ``from_cot_checkpoint``,
``trains``); this module knows no method but the base.

Layout under ``out``: ``seed<k>/<method>/`` run dirs, ``seed<k>/logs/<method>.log`` training
output, ``seed<k>/compare.{md,json}`` the seed's table, ``results/seed<k>/<method>.json`` one small
result per run (summary, per-problem correctness and latent counts, analyses, provenance: what
``ltscale report`` renders and what the repository keeps), ``compare.md`` the report over seeds.
Resumable: a finished stage is not trained again (its train time is reused from
``seed<k>/times.json``) and a result whose inputs did not change is not scored again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ltscale import rundir
from ltscale.config import RunConfig, parse_yaml, save_resolved
from ltscale.eval.compare_results import load_compare_results, make_result, provenance, render_compare_report
from ltscale.eval.evaluate import evaluate
from ltscale.fsutil import atomic_write_text
from ltscale.methods import METHOD_NAMES, get_method
from ltscale.run_config import config_from_dict

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
#: The run every other method starts from: CoT-SFT (LT-Tuning's stage 1, Coconut's CoT model).
BASE = "cot"
ALL = (BASE, *(m for m in METHOD_NAMES if m != BASE))
RESULTS_DIR = "results"
#: Problems traced one by one for the collapse numbers (the difficulty correlation uses all).
ANALYSIS_SAMPLES = 64
PROBE_STEPS = 6


def run_config(
    method: str,
    out: Path,
    cot_hf: Path,
    overrides: Sequence[str],
    configs_dir: Path = ROOT / "configs",
    stage_epochs: Sequence[float] | None = None,
) -> RunConfig:
    """The resolved config of ``method``'s compare run (see the module docstring)."""
    how = get_method(method)
    raw = parse_yaml((configs_dir / how.tiny_config).read_text())
    raw["method"] = method  # a method may run another method's tiny config (cot_same_steps: tiny.yaml)
    raw["run_dir"] = str(out / method)
    raw.setdefault("eval", {})["after_each_stage"] = False  # scored afterwards, outside the train time
    if stage_epochs is not None:
        raw = how.stage_budget(raw, list(stage_epochs))
    if method != BASE:
        model = {
            k: v
            for k, v in raw.get("model", {}).items()
            if k not in ("init", "tokenizer", "tokenizer_vocab_size")
        }
        raw["model"] = {**model, "name_or_path": str(cot_hf)}
        if how.trains:  # else only its decoding settings matter
            raw = how.from_cot_checkpoint(raw, configs_dir.parent)
        # the model is the CoT checkpoint: model.* overrides shape only the CoT run
        overrides = [o for o in overrides if not o.startswith("model.")]
    return config_from_dict(raw, list(overrides))


def heldout_records(cfg: RunConfig, n: int | None) -> list:
    """The config's eval split, or ``n`` held-out problems: that split, then more problems of the
    same synthetic test stream, skipping every question of the training split.

    Why not ``data.synthetic.n_test=n``: the training split drops the questions of the test split,
    so a larger test split shifts which problems the model trains on. Here the training split is
    the config's own, unchanged; the price is that the added problems exclude the (mostly one-step)
    questions that training happens to contain, which docs/study.md reports.
    """
    from ltscale.data.synthetic import synthetic_splits  # noqa: PLC0415 - with the records below
    from ltscale.run_setup import load_split_records  # noqa: PLC0415 - torch: only when a run is scored

    base = load_split_records(cfg, "eval")
    if n is None or n <= len(base):
        return base if n is None else base[:n]
    d = cfg.data
    if d.eval != "synthetic" or d.train != "synthetic" or d.eval_limit is not None:
        raise ValueError(
            f"--heldout {n}: more than the {len(base)} eval problems of the config can only be drawn "
            "from the synthetic generator (data.train and data.eval synthetic, no data.eval_limit)"
        )
    s = d.synthetic
    train_questions = {r.question for r in load_split_records(cfg, "train")}
    draw = n
    while True:
        _, stream = synthetic_splits(
            0,
            draw,
            s.seed,
            min_steps=s.min_steps,
            max_steps=s.max_steps,
            max_value=s.max_value,
            max_operand=s.max_operand,
        )
        if [r.question for r in stream[: len(base)]] != [r.question for r in base]:
            raise ValueError("synthetic test stream: its first problems are not the config's eval split")
        extra = [r for r in stream[len(base) :] if r.question not in train_questions]
        if len(base) + len(extra) >= n or len(stream) < draw:
            break
        draw *= 2
    if len(base) + len(extra) < n:
        raise ValueError(f"--heldout {n}: the generator has only {len(base) + len(extra)} such problems")
    return base + extra[: n - len(base)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_run(config_file: Path, nproc: int, log_file: Path) -> float:
    """Train in a subprocess (one rank, or ``nproc`` under torchrun), its output in ``log_file``;
    returns its wall seconds."""
    script = str(ROOT / "ltscale" / "train.py")
    cmd = [sys.executable, script]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            script,
        ]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log_file.open("w") as f:
        proc = subprocess.run(
            [*cmd, "--config", str(config_file)],
            env=env,
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
        )
    if proc.returncode != 0:
        tail = log_file.read_text()[-4000:]
        raise RuntimeError(
            f"{' '.join(cmd)} --config {config_file} failed ({proc.returncode}); log {log_file}:\n{tail}"
        )
    return time.perf_counter() - t0


def last_hf(cfg: RunConfig) -> Path:
    return rundir.hf_dir(cfg.run_dir, len(cfg.stages))


def score(
    hf: Path,
    records,
    *,
    method: str,
    cfg: RunConfig,
    batch_size: int,
    max_new_tokens: int,
    analysis_samples: int = ANALYSIS_SAMPLES,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(summary, per-problem results, analysis numbers) of one checkpoint under its method."""
    from ltscale.eval.analysis import run_analysis  # noqa: PLC0415 - torch
    from ltscale.inference import load_for_inference  # noqa: PLC0415 - torch: only when a run is scored

    inf = load_for_inference(hf, method, device="cpu", cfg=cfg)
    summary, per_example = evaluate(
        inf, records, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False
    )
    try:
        res = run_analysis(
            inf.model,
            inf.tokenizer,
            records[:analysis_samples],
            max_new_tokens=max_new_tokens,
            probe_steps=PROBE_STEPS,
            attention=False,
            use_chat_template=cfg.model.use_chat_template,
            examples=per_example,
        )
        analysis = {k: v for k, v in res.to_json().items() if k != "curves"}
    except Exception as e:  # noqa: BLE001 - a decoding the analysis cannot trace keeps its accuracy
        log.warning(
            "compare: %s: analysis failed (%s: %s); the result has no collapse numbers",
            method,
            type(e).__name__,
            e,
        )
        analysis = {"error": f"{type(e).__name__}: {e}"}
    return summary.to_dict(), per_example, analysis


def format_compare_table(rows: Sequence[dict[str, Any]]) -> str:
    head = [
        "method",
        "starts from",
        "n",
        "accuracy (%)",
        "numeric acc. (%)",
        "mean latent tokens",
        "mean generated tokens",
        "train time (s)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---", ":---"] + ["---:"] * 6) + "|"]
    for r in rows:
        cells = [
            r["method"],
            r["from"],
            str(r["n"]),
            f"{100 * r['accuracy_official']:.2f}",
            f"{100 * r['accuracy_numeric']:.2f}",
            f"{r['mean_latent_tokens']:.2f}",
            f"{r['mean_generated_tokens']:.2f}",
            f"{r['train_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fingerprint(cfg: RunConfig, hf: Path, records, analysis_samples: int) -> str:
    """Changes when anything that decides a result changes: config, weights on disk, problems."""
    weights = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(hf).glob("*") if p.is_file()
    )
    blob = json.dumps(
        [cfg.to_dict(), str(hf), weights, [r.id for r in records], analysis_samples], default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def compare_seed(
    out: Path,
    seed: int | None,
    methods: Sequence[str],
    *,
    results: Path,
    nproc: int,
    overrides: Sequence[str],
    configs_dir: Path,
    stage_epochs: Sequence[float] | None,
    heldout: int | None,
    analysis_samples: int,
    meta: dict[str, Any],
    positions: dict[str, int],
) -> list[dict[str, Any]]:
    """Train what ``methods`` need for one seed, score every one; returns the seed's table rows.
    ``positions``: each method's report row (:func:`row_positions`)."""
    overrides = [*overrides, f"train.seed={seed}"] if seed is not None else list(overrides)
    out.mkdir(parents=True, exist_ok=True)
    times_file = out / "times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    base_cfg = run_config(BASE, out, out, overrides, configs_dir, stage_epochs)
    seed = base_cfg.train.seed
    cot_hf = last_hf(base_cfg)
    cfgs = {BASE: base_cfg}
    for m in methods:
        if m not in cfgs:
            cfgs[m] = run_config(m, out, cot_hf, overrides, configs_dir, stage_epochs)
    need = [BASE] + [m for m in methods if m != BASE and get_method(m).trains]
    for m in need:
        cfg = cfgs[m]
        if all(rundir.stage_complete(cfg.run_dir, k) for k in range(1, len(cfg.stages) + 1)) and m in times:
            log.info("compare: seed %s: %s already trained (%s)", seed, m, cfg.run_dir)
            continue
        cfg_file = save_resolved(cfg, out / "configs" / m)
        log.info("compare: seed %s: training %s (%d stage(s)) -> %s", seed, m, len(cfg.stages), cfg.run_dir)
        times[m] = train_run(cfg_file, nproc, out / "logs" / f"{m}.log")
        atomic_write_text(times_file, json.dumps(times, indent=2))
    records = heldout_records(base_cfg, heldout)
    rows = []
    for m in methods:
        cfg, position = cfgs[m], positions[m]
        if m == BASE:
            hf, start, seconds = cot_hf, "scratch", times[m]
        elif get_method(m).trains:
            hf, start, seconds = last_hf(cfg), "CoT ckpt", times[m]
        else:
            hf, start, seconds = cot_hf, "CoT ckpt (no training)", 0.0
        path = results / f"seed{seed}" / f"{m}.json"
        fp = _fingerprint(cfg, hf, records, analysis_samples)
        old = json.loads(path.read_text()) if path.is_file() else None
        if old is not None and old.get("fingerprint") == fp:
            log.info("compare: seed %s: %s already scored (%s)", seed, m, path)
            result = old
            if old.get("position") != position:
                result = {**old, "position": position}
                atomic_write_text(path, json.dumps(result, separators=(",", ":")) + "\n")
        else:
            log.info("compare: seed %s: scoring %s (%s) on %d problems", seed, m, hf, len(records))
            summary, per_example, analysis = score(
                hf,
                records,
                method=m,
                cfg=cfg,
                batch_size=cfg.eval.batch_size,
                max_new_tokens=cfg.eval.max_new_tokens,
                analysis_samples=analysis_samples,
            )
            result = make_result(
                method=m,
                position=position,
                seed=seed,
                starts_from=start,
                train_seconds=seconds,
                stages=[{"mode": st.mode, "epochs": st.epochs, "lr_scale": st.lr_scale} for st in cfg.stages],
                summary=summary,
                per_example=per_example,
                analysis=analysis,
                fingerprint=fp,
                provenance=meta,
            )
            atomic_write_text(path, json.dumps(result, separators=(",", ":")) + "\n")
        rows.append(
            {"method": m, "from": start, "train_seconds": seconds, "checkpoint": str(hf), **result["summary"]}
        )
    atomic_write_text(out / "compare.md", format_compare_table(rows) + "\n")
    atomic_write_text(out / "compare.json", json.dumps(rows, indent=2))
    return rows


def row_positions(results: Path, methods: Sequence[str]) -> dict[str, int]:
    """Report row of every method in ``results`` or ``methods``: methods already compared keep
    their order (earlier compare runs first, each in its given order), new ones follow in the order
    given, so a later ``--methods`` run adds rows after the earlier ones instead of interleaving."""
    first: dict[str, tuple[str, int]] = {}
    for r in load_compare_results(results) if any(results.glob("seed*/*.json")) else []:
        key = ((r.get("provenance") or {}).get("date", ""), r.get("position", 0))
        first[r["method"]] = min(first.get(r["method"], key), key)
    order = sorted(first, key=first.__getitem__) + [m for m in methods if m not in first]
    return {m: i for i, m in enumerate(order)}


def compare(
    out: Path,
    *,
    methods: Sequence[str] = ALL,
    seeds: Sequence[int] | None = None,
    heldout: int | None = None,
    stage_epochs: Sequence[float] | None = None,
    nproc: int = 2,
    overrides: Sequence[str] = (),
    configs_dir: Path = ROOT / "configs",
    analysis_samples: int = ANALYSIS_SAMPLES,
    command: str | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """Train and score ``methods`` for every seed (the configs' own seed when ``seeds`` is None);
    write ``<out>/compare.md``, the report over seeds. Returns it and every seed's rows."""
    unknown = [m for m in methods if m not in ALL]
    if unknown:
        raise ValueError(f"--methods: {unknown} not in {', '.join(ALL)}")
    if seeds is not None and any(o.startswith("train.seed=") for o in overrides):
        raise ValueError("train.seed=...: --seeds sets the seed of every run; give one or the other")
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: {list(seeds)} repeats a seed")
    if heldout is not None and heldout < 1:
        raise ValueError(f"--heldout: must be >= 1, got {heldout}")
    out = Path(out).resolve()
    results = out / RESULTS_DIR
    meta = provenance(command, ROOT)
    positions = row_positions(results, methods)
    all_rows = []
    for seed in seeds if seeds is not None else [None]:
        seed_out = out / f"seed{seed}" if seed is not None else None
        if seed_out is None:  # the configs' own seed names the dir
            seed_out = (
                out / f"seed{run_config(BASE, out, out, overrides, configs_dir, stage_epochs).train.seed}"
            )
        all_rows += compare_seed(
            seed_out,
            seed,
            methods,
            results=results,
            nproc=nproc,
            overrides=overrides,
            configs_dir=configs_dir,
            stage_epochs=stage_epochs,
            heldout=heldout,
            analysis_samples=analysis_samples,
            meta=meta,
            positions=positions,
        )
    report = render_compare_report(load_compare_results(results))
    atomic_write_text(out / "compare.md", report)
    return report, all_rows
