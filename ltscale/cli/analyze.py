"""``ltscale analyze``: the paper's analyses on one checkpoint (latent tokens vs difficulty,
entropy/attention, feature collapse): numbers in ``analysis.json`` plus three PNG figures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ltscale import rundir
from ltscale.cli import common
from ltscale.fsutil import atomic_write_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="latent tokens vs difficulty, entropy/attention, feature collapse")
    common.add_checkpoint_args(p, decoding=False)
    p.add_argument(
        "--data", required=True, help="a benchmark name (gsm8k, svamp, asdiv, multiarith) or a file"
    )
    p.add_argument("--split", default=None)
    p.add_argument(
        "--limit", type=common.positive_int, default=100, help="problems to trace (default 100, as the paper)"
    )
    p.add_argument("--output-dir", default="analysis", help="analysis.json and the PNG figures go here")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=256)
    p.add_argument(
        "--probe-steps", type=int, default=6, help="forced latent steps for the collapse probe (0: off)"
    )
    p.add_argument(
        "--examples", default=None, help="eval examples JSONL: difficulty analysis over it instead"
    )
    p.add_argument("--no-attention", action="store_true", help="skip attention capture (keeps sdpa; faster)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _examples_arg(arg: str | None) -> list[dict] | None:
    if not arg:
        return None
    path = Path(arg).expanduser()
    if not path.is_file():
        raise common.UserError(f"--examples: file not found: {path}")
    try:
        examples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise common.UserError(f"--examples: {path}:{e.lineno}: not JSONL ({e.msg})") from None
    missing = [i for i, e in enumerate(examples, 1) if "difficulty" not in e or "num_latent" not in e]
    if missing:
        raise common.UserError(
            f"--examples: {path}:{missing[0]}: needs 'difficulty' and 'num_latent' (an eval examples file)"
        )
    return examples


def run(args: argparse.Namespace) -> int:
    ckpt = common.checkpoint_arg(args.checkpoint)
    records = common.load_benchmark_arg(args.data, split=args.split, limit=args.limit)
    examples = _examples_arg(args.examples)

    from ltscale.eval.analysis import run_analysis  # noqa: PLC0415 - torch
    from ltscale.eval.plots import save_figures  # noqa: PLC0415 - matplotlib

    inf = common.load_inference(args, ckpt)
    model = inf.model
    result = run_analysis(
        model,
        inf.tokenizer,
        records,
        max_new_tokens=args.max_new_tokens,
        probe_steps=args.probe_steps,
        attention=not args.no_attention,
        use_chat_template=args.chat_template,
        examples=examples,
        progress=not args.no_progress,
    )
    out_dir = Path(args.output_dir)
    payload = {
        **result.to_json(),
        "scalars": result.scalars(),
        "meta": {
            "checkpoint": str(ckpt),
            "data": args.data,
            "limit": args.limit,
            "mode": model.mode,
            "max_new_tokens": args.max_new_tokens,
            "probe_steps": args.probe_steps,
            "examples": args.examples,
        },
    }
    atomic_write_text(out_dir / rundir.ANALYSIS_FILE, json.dumps(payload, indent=2) + "\n")
    figures = save_figures(result.figures(), out_dir)
    rho = result.difficulty.get("spearman")
    print(f"traced {result.numbers['n_traced']} problems ({model.mode} mode)")
    rho_text = "n/a" if rho is None else f"{rho:.3f}"
    print(f"difficulty vs latent tokens: Spearman {rho_text} over {result.difficulty['n']} problems")
    for source in ("collapse", "probe_collapse"):
        for k, m in result.numbers[source].items():
            print(
                f"{source} step {k}: mean cos {m['mean_cos']:.3f}  effective rank {m['effective_rank']:.2f}  "
                f"PC1 {m['pc1_explained']:.3f}  (n={m['n']})"
            )
    print(f"wrote {out_dir / rundir.ANALYSIS_FILE} and {', '.join(p.name for p in figures)}")
    return common.EXIT_OK
