"""``ltscale compare``: every method on the tiny default, one table (accuracy, latent tokens, train time).

Protocol (why): the methods are compared as fine-tunings of **one** CoT-SFT checkpoint, as
Coconut's GSM8K recipe starts from its CoT model and LT-Tuning's stage 1 *is* CoT-SFT. So the
``cot`` run (``configs/tiny-cot.yaml``) trains first; every other training method starts from its
``stage1/hf`` export with its own latent stages only (LT-Tuning variants drop their stage 1,
Coconut starts at its stage 1, SoftCoT trains its projection on the frozen CoT model), and
Soft-Thinking decodes the CoT checkpoint without training. Train time is each run's own wall
time (set-up, steps, checkpoints, exports; no eval) -- the CoT time is listed once, in its row.
Every checkpoint is then scored by the same evaluator, in this process, with the method's own
decoding (``ltscale.inference.load_for_inference``) on the tiny default's 200 held-out problems.

Which config a method runs, what it keeps of it when it starts from the CoT checkpoint and
whether it trains at all are the method's hooks (``Method.tiny_config``, ``from_cot_checkpoint``,
``trains``); this module knows no method but the base.

Runs go to ``<out>/<method>`` and are resumable: a finished stage is not trained again (its
recorded train time is reused from ``<out>/times.json``).
"""

from __future__ import annotations

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
from ltscale.eval.evaluate import evaluate
from ltscale.methods import METHOD_NAMES, get_method
from ltscale.run_config import config_from_dict

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
#: The run every other method starts from: CoT-SFT (LT-Tuning's stage 1, Coconut's CoT model).
BASE = "cot"
ALL = (BASE, *(m for m in METHOD_NAMES if m != BASE))


def run_config(
    method: str, out: Path, cot_hf: Path, overrides: Sequence[str], configs_dir: Path = ROOT / "configs"
) -> RunConfig:
    """The resolved config of ``method``'s compare run (see the module docstring)."""
    how = get_method(method)
    raw = parse_yaml((configs_dir / how.tiny_config).read_text())
    raw["run_dir"] = str(out / method)
    raw.setdefault("eval", {})["after_each_stage"] = False  # scored afterwards, outside the train time
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_run(config_file: Path, nproc: int) -> float:
    """Train in a subprocess (one rank, or ``nproc`` under torchrun); returns its wall seconds."""
    script = str(ROOT / "ltscale" / "train.py")
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
    else:
        cmd = [sys.executable, script]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*cmd, "--config", str(config_file)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} --config {config_file} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return time.perf_counter() - t0


def last_hf(cfg: RunConfig) -> Path:
    return rundir.hf_dir(cfg.run_dir, len(cfg.stages))


def score(
    hf: Path, records, *, method: str, cfg: RunConfig, batch_size: int, max_new_tokens: int
) -> dict[str, Any]:
    from ltscale.inference import load_for_inference  # noqa: PLC0415 - torch: only when a run is scored

    inf = load_for_inference(hf, method, device="cpu", cfg=cfg)
    summary, _ = evaluate(inf, records, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False)
    return summary.to_dict()


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


def compare(
    out: Path,
    *,
    methods: Sequence[str] = ALL,
    nproc: int = 2,
    overrides: Sequence[str] = (),
    configs_dir: Path = ROOT / "configs",
) -> tuple[str, list[dict[str, Any]]]:
    """Train what ``methods`` need, score every one, write ``compare.{md,json}`` in ``out``."""
    from ltscale.run_setup import load_split_records  # noqa: PLC0415 - torch: only when a run is scored

    unknown = [m for m in methods if m not in ALL]
    if unknown:
        raise ValueError(f"--methods: {unknown} not in {', '.join(ALL)}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    times_file = out / "times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    base_cfg = run_config(BASE, out, out, overrides, configs_dir)
    cot_hf = last_hf(base_cfg)
    cfgs = {BASE: base_cfg}
    for m in methods:
        if m not in cfgs:
            cfgs[m] = run_config(m, out, cot_hf, overrides, configs_dir)
    need = [BASE] + [m for m in methods if m != BASE and get_method(m).trains]
    for m in need:
        cfg = cfgs[m]
        if all(rundir.stage_complete(cfg.run_dir, k) for k in range(1, len(cfg.stages) + 1)) and m in times:
            log.info("compare: %s already trained (%s)", m, cfg.run_dir)
            continue
        cfg_file = save_resolved(cfg, out / "configs" / m)
        log.info("compare: training %s (%d stage(s)) -> %s", m, len(cfg.stages), cfg.run_dir)
        times[m] = train_run(cfg_file, nproc)
        times_file.write_text(json.dumps(times, indent=2))
    records = None
    rows = []
    for m in methods:
        cfg = cfgs[m]
        if m == BASE:
            hf, start, seconds = cot_hf, "scratch", times[m]
        elif get_method(m).trains:
            hf, start, seconds = last_hf(cfg), "CoT ckpt", times[m]
        else:
            hf, start, seconds = cot_hf, "CoT ckpt (no training)", 0.0
        if records is None:
            records = load_split_records(cfg, "eval")
        log.info("compare: scoring %s (%s)", m, hf)
        summary = score(
            hf,
            records,
            method=m,
            cfg=cfg,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
        )
        rows.append({"method": m, "from": start, "train_seconds": seconds, "checkpoint": str(hf), **summary})
    table = format_compare_table(rows)
    (out / "compare.md").write_text(table + "\n")
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    return table, rows
