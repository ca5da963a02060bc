"""The ``ltscale`` console script: ``eval``, ``generate``, ``export``, ``env``, ``data synth``, ``data check``.

Exit codes: 0 success; 1 ``data check`` found invalid records (a validation result, like a
linter); 2 user error (missing checkpoint or data file, bad arguments, unreadable data) — reported
as one ``ltscale: error: ...`` line on stderr without a traceback. Anything else is a bug and
propagates with its traceback.

Heavy imports (torch, transformers, the model package) happen inside the subcommands, so
``ltscale --help`` and ``ltscale data check`` stay fast and argument errors surface first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["UserError", "build_parser", "main", "resolve_checkpoint"]

logger = logging.getLogger("ltscale.cli")

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
_STAGE_RE = re.compile(r"^stage(\d+)$")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv", ".txt", ".gz")


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


# ---------------------------------------------------------------------------------- checkpoints


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Find the HF model directory behind ``--checkpoint``.

    Accepts, in this order: an HF dir (has ``config.json``; written by ``save_pretrained`` with
    ``ltscale_latent.json`` beside it), a stage dir (uses ``<dir>/hf``), or a run dir (uses the
    ``hf`` of the highest-numbered ``stageN`` that has one — a stage that was interrupted before its
    export is skipped with a log line). Raises ``FileNotFoundError`` listing what was looked for.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p} does not exist")
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {p} is not a directory")
    looked = [p / "config.json"]
    if _is_hf_dir(p):
        return p
    looked.append(p / "hf" / "config.json")
    if _is_hf_dir(p / "hf"):
        return p / "hf"
    stages = sorted(
        (
            (int(m.group(1)), child)
            for child in p.iterdir()
            if (m := _STAGE_RE.match(child.name)) and child.is_dir()
        ),
        reverse=True,
    )
    for n, stage_dir in stages:
        looked.append(stage_dir / "hf" / "config.json")
        if _is_hf_dir(stage_dir / "hf"):
            if n != stages[0][0]:
                logger.warning("stage%d has no hf export yet; using %s", stages[0][0], stage_dir / "hf")
            return stage_dir / "hf"
    if not stages:
        looked.append(p / "stage<N>" / "hf" / "config.json")
    listing = "\n  ".join(str(x) for x in looked)
    raise FileNotFoundError(
        f"no model checkpoint under {p}; expected an HF dir, a stage dir or a run dir. Looked for:\n  {listing}"
    )


def _checkpoint(path: str) -> Path:
    try:
        return resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None


# ----------------------------------------------------------------------------------------- data


def _looks_like_path(source: str) -> bool:
    """A local file rather than a hub name like ``openai/gsm8k`` (which also contains a slash)."""
    return source.startswith((".", "/", "~")) or source.lower().endswith(_DATA_SUFFIXES)


def _load_records(source: str, *, split: str | None = None, limit: int | None = None) -> list[Any]:
    """load_records with user errors (missing file, invalid data) turned into :class:`UserError`."""
    if _looks_like_path(source) and not Path(source).expanduser().exists():
        raise UserError(f"data file not found: {source}")
    from ltscale.data.records import DataError, load_records

    try:
        return load_records(source, split=split, strict=True, limit=limit)
    except (DataError, FileNotFoundError) as e:
        raise UserError(f"cannot load data {source!r}: {e}") from None


def _record_to_json(record: Any) -> dict[str, Any]:
    """The on-disk record form ``{id, question, steps, answer, ...}`` that load_records reads."""
    if isinstance(record, dict):
        return dict(record)
    if hasattr(record, "to_dict"):  # ltscale.data.records.Record: also inlines extra fields
        return record.to_dict()
    return {
        "id": record.id,
        "question": record.question,
        "steps": list(record.steps),
        "answer": record.answer,
    }


# -------------------------------------------------------------------------------- distributed


def _launcher_world_size() -> int:
    """World size announced by the launcher (torchrun/deepspeed, Open MPI, PMI), 1 when none."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def _dist_context() -> tuple[int, int, int]:
    """(rank, world_size, local_rank): joins the process group only when launched with several ranks.

    A plain ``ltscale eval`` never touches ``torch.distributed``; under ``torchrun``/``deepspeed``/
    ``mpirun`` each rank evaluates its exact shard and rank 0 gathers, summarises and writes.
    """
    if _launcher_world_size() <= 1:
        return 0, 1, 0
    from ltscale.engine.dist import init_distributed

    info = init_distributed()
    return info.rank, info.world_size, info.local_rank


def _device(arg: str, local_rank: int = 0) -> str:
    if arg != "auto":
        return arg
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def _console_marker(marker: str) -> str:
    """Fall back to ``<thinking>`` when stdout cannot encode the marker (e.g. a C locale)."""
    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        marker.encode(enc)
    except (UnicodeEncodeError, LookupError):
        return "<thinking>"
    return marker


# ------------------------------------------------------------------------------------ commands


def _load_benchmark(source: str, *, split: str | None, limit: int | None) -> list[Any]:
    """A benchmark name (gsm8k, svamp, asdiv, multiarith) or any source ``load_records`` reads."""
    from ltscale.eval.benchmarks import BENCHMARKS, load_benchmark

    if source.lower() not in BENCHMARKS:
        return _load_records(source, split=split, limit=limit)
    from ltscale.data.records import DataError

    try:
        return load_benchmark(source, split=split, limit=limit)
    except (DataError, FileNotFoundError) as e:
        raise UserError(f"cannot load benchmark {source!r}: {e}") from None


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate one checkpoint on one or several benchmarks (sharded over launcher ranks).

    One ``--data`` source writes the single-summary JSON (``<stem>.examples.jsonl`` beside it);
    several write ``{"benchmarks": {...}, "average": {...}}`` with one examples file per benchmark.
    """
    from ltscale.eval.benchmarks import (
        benchmark_name,
        expand_sources,
        suite_examples_path,
        write_suite_results,
    )

    ckpt = _checkpoint(args.checkpoint)
    sources = expand_sources(args.data)
    datasets = {}
    for source in sources:  # all data errors surface before the model is loaded
        records = _load_benchmark(source, split=args.split, limit=args.limit)
        if not records:
            raise UserError(f"no records in {source}")
        datasets[benchmark_name(source)] = (source, records)
    rank, world, local_rank = _dist_context()

    from ltscale.eval.evaluate import (
        evaluate,
        examples_path,
        format_table,
        merge_results,
        summarize,
        write_results,
    )
    from ltscale.model.io import load_latent_model

    model, tokenizer = load_latent_model(str(ckpt), mode=args.mode, device=_device(args.device, local_rank))
    # The checkpoint's method decides the decoding (Coconut: forced latents) unless --method overrides it.
    how = _method_inference(args, model, tokenizer, ckpt)
    results = {}
    for name, (_, records) in datasets.items():
        if rank == 0 and len(datasets) > 1:
            logger.info("benchmark %s: %d problems", name, len(records))
        summary, per_example = evaluate(
            how.model,
            tokenizer,
            records,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            without_thinking=args.without_thinking or how.without_thinking,
            prompt_fn=how.prompt_fn,
            use_chat_template=args.chat_template,
            progress=not args.no_progress,
            rank=rank,
            world_size=world,
        )
        if world > 1:
            from ltscale.engine.dist import all_gather_object

            per_example = merge_results(all_gather_object(per_example))
            summary = summarize(per_example)
        results[name] = (summary, per_example)
    if rank != 0:
        return EXIT_OK
    meta = {
        "checkpoint": str(ckpt),
        "method": args.method or "(the checkpoint's own)",
        "method_options": args.method_option or [],
        "data": args.data[0] if len(args.data) == 1 else list(args.data),
        "sources": {name: src for name, (src, _) in datasets.items()},
        "split": args.split,
        "limit": args.limit,
        "mode": args.mode,
        "without_thinking": args.without_thinking,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "chat_template": args.chat_template,
        "decoding": "greedy",
        "world_size": world,
    }
    output = Path(args.output)
    stage = ckpt.parent.name if ckpt.name == "hf" else ckpt.name
    if len(results) == 1:
        ((name, (summary, per_example)),) = results.items()
        write_results(summary, per_example, output, meta={**meta, "benchmark": name})
        written = [examples_path(output)]
    else:
        write_suite_results(results, output, meta=meta)
        written = [suite_examples_path(output, name) for name in results]
    rows = [{"stage": f"{stage} {name}", **s.to_dict()} for name, (s, _) in results.items()]
    print(format_table(rows))
    for name, (summary, _) in results.items():
        print(
            f"\n{name}: n={summary.n}  accuracy={100 * summary.accuracy_official:.2f}%  "
            f"numeric={100 * summary.accuracy_numeric:.2f}%  mean latent tokens={summary.mean_latent_tokens:.2f}  "
            f"truncated={summary.num_truncated}"
        )
        if summary.by_difficulty:
            print("by difficulty (steps: n, accuracy %, mean latent):")
            for d, row in summary.by_difficulty.items():
                print(
                    f"  {d:>3}: {int(row['n']):>5}  {100 * row['accuracy']:6.2f}  {row['mean_latent']:6.2f}"
                )
    if len(results) > 1:
        from ltscale.eval.benchmarks import suite_average

        avg = suite_average({n: s for n, (s, _) in results.items()})
        print(
            f"\naverage over {len(results)} benchmarks: accuracy={100 * avg['accuracy_official']:.2f}%  "
            f"numeric={100 * avg['accuracy_numeric']:.2f}%  mean latent tokens={avg['mean_latent_tokens']:.2f}"
        )
    print(f"\nwrote {output} and {', '.join(str(p) for p in written)}")
    return EXIT_OK


def _method_inference(args: argparse.Namespace, model: Any, tokenizer: Any, ckpt: Path) -> Any:
    from ltscale.config import ConfigError, parse_yaml
    from ltscale.methods import inference_for

    options: dict[str, dict[str, Any]] = {}
    for item in args.method_option or []:
        key, sep, text = item.partition("=")
        section, dot, field = key.partition(".")
        if not (sep and dot and field):
            raise UserError(f"--method-option {item!r}: expected SECTION.KEY=VALUE, e.g. soft_thinking.top_k=5")
        options.setdefault(section, {})[field] = parse_yaml(text)
    try:
        return inference_for(model, tokenizer, ckpt, method=args.method, chat=args.chat_template, options=options)
    except (ConfigError, TypeError, ValueError) as e:
        raise UserError(f"--method: {e}") from None


def cmd_analyze(args: argparse.Namespace) -> int:
    """The paper's analyses on one checkpoint: numbers in ``analysis.json`` plus three PNG figures."""
    ckpt = _checkpoint(args.checkpoint)
    records = _load_benchmark(args.data, split=args.split, limit=args.limit)
    if not records:
        raise UserError(f"no records in {args.data}")
    examples = None
    if args.examples:
        path = Path(args.examples).expanduser()
        if not path.is_file():
            raise UserError(f"--examples: file not found: {path}")
        try:
            examples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise UserError(f"--examples: {path}:{e.lineno}: not JSONL ({e.msg})") from None
        missing = [i for i, e in enumerate(examples, 1) if "difficulty" not in e or "num_latent" not in e]
        if missing:
            raise UserError(
                f"--examples: {path}:{missing[0]}: needs 'difficulty' and 'num_latent' (an eval examples file)"
            )

    from ltscale.eval.analysis import run_analysis
    from ltscale.eval.plots import save_figures
    from ltscale.fsutil import atomic_write_text
    from ltscale.model.io import load_latent_model

    model, tokenizer = load_latent_model(str(ckpt), mode=args.mode, device=_device(args.device))
    result = run_analysis(
        model,
        tokenizer,
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
    atomic_write_text(out_dir / "analysis.json", json.dumps(payload, indent=2) + "\n")
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
    print(f"wrote {out_dir / 'analysis.json'} and {', '.join(p.name for p in figures)}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """Markdown table (method x benchmark, latent tokens, collapse) from run dirs' eval JSONs."""
    from ltscale.eval.report import collect_run, render_report

    try:
        runs = [collect_run(Path(p), metric=args.metric) for p in args.runs]
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    text = render_report(runs, metric=args.metric)
    if args.output:
        from ltscale.fsutil import atomic_write_text

        atomic_write_text(Path(args.output), text)
    print(text, end="")
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    ckpt = _checkpoint(args.checkpoint)
    if not args.question.strip():
        raise UserError("the question is empty")

    import torch

    from ltscale.data.formatting import prompt_ids
    from ltscale.eval.evaluate import decode_generated
    from ltscale.eval.extraction import THINKING_TOKEN, extract_answer
    from ltscale.model.io import load_latent_model

    model, tokenizer = load_latent_model(str(ckpt), mode=args.mode, device=_device(args.device))
    if hasattr(model, "eval"):
        model.eval()
    ids = list(prompt_ids(tokenizer, args.question, use_chat_template=args.chat_template))
    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        device = torch.device("cpu")
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.no_grad():
        out = model.generate(
            input_ids,
            torch.ones_like(input_ids),
            args.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            without_thinking=args.without_thinking,
        )
    n = int(out.lengths[0])
    gen = out.sequences[0, :n].tolist()
    ended = bool(gen) and gen[-1] == tokenizer.eos_token_id
    if ended:
        gen = gen[:-1]
    text = decode_generated(tokenizer, gen, getattr(model, "thinking_token_id", None))
    answer = extract_answer(text)
    print(text.replace(THINKING_TOKEN, _console_marker(args.marker)))
    print()
    print(f"answer: {answer if answer else '(none)'}")
    stopped = "  (cut at --max-new-tokens)" if not ended and n >= args.max_new_tokens else ""
    print(f"latent steps: {int(out.num_latent[0])}  generated tokens: {n}{stopped}")
    return EXIT_OK


def cmd_data_synth(args: argparse.Namespace) -> int:
    from ltscale.data.synthetic import generate_problems
    from ltscale.eval.evaluate import atomic_write_text

    records = generate_problems(args.n, seed=args.seed)
    out = Path(args.out)
    text = "".join(json.dumps(_record_to_json(r), ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(out, text)
    print(f"wrote {len(records)} records to {out}")
    return EXIT_OK


def cmd_data_check(args: argparse.Namespace) -> int:
    path = Path(args.file).expanduser()
    if not path.exists():
        raise UserError(f"data file not found: {args.file}")
    from ltscale.data.records import DataError, load_records

    try:
        records = load_records(str(path), split=args.split, strict=True)
    except DataError as e:
        print(f"ltscale: invalid data: {e}", file=sys.stderr)
        return EXIT_INVALID
    counts: dict[int, int] = {}
    for r in records:
        d = int(r.difficulty)
        counts[d] = counts.get(d, 0) + 1
    hist = ", ".join(f"{d}: {c}" for d, c in sorted(counts.items()))
    print(f"{path}: {len(records)} records OK (steps -> count: {hist or 'none'})")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Thin: all logic (and all deepspeed use) lives in ``ltscale.engine.export``."""
    from ltscale.engine.export import ExportError, export_checkpoint, resolve_source

    try:
        src = resolve_source(args.checkpoint, tag=args.tag, stage=args.stage)
        out = export_checkpoint(
            src.ckpt_root, src.tag, Path(args.output), run_dir=src.run_dir, stage=src.stage, dtype=args.dtype
        )
    except ExportError as e:
        raise UserError(str(e)) from None
    source = json.loads((out / "ltscale_latent.json").read_text())["source"]
    print(f"exported {source['checkpoint']} (stage {src.stage}, step {source['step_in_stage']}) -> {out}")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    """Thin: the protocol lives in ``ltscale.compare``."""
    from ltscale.compare import ALL, compare
    from ltscale.config import ConfigError

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(ALL)
    try:
        table, _ = compare(Path(args.out), methods=methods, nproc=args.nproc, overrides=args.overrides)
    except (ConfigError, ValueError) as e:
        raise UserError(str(e)) from None
    print(table)
    print(f"\nwrote {Path(args.out) / 'compare.md'} and compare.json")
    return EXIT_OK


def cmd_env(args: argparse.Namespace) -> int:
    from ltscale.engine.envinfo import collect, format_report

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return EXIT_OK


# -------------------------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    """argparse type: bad sizes are usage errors (exit 2), not tracebacks from deep inside eval."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="HF dir, stage dir (uses hf/) or run dir (highest stage)"
    )
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
    p.add_argument(
        "--mode",
        choices=["hidden", "fusion", "pause"],
        default=None,
        help="latent input function (default: the one saved with the checkpoint)",
    )
    p.add_argument("--without-thinking", action="store_true", help="mask <thinking>: pure explicit decoding")
    p.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="format the prompt with the tokenizer's chat template (default: auto)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltscale", description="LT-Tuning latent-reasoning toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{eval,analyze,report,generate,export,compare,env,data}"
    )

    p = sub.add_parser("eval", help="accuracy, mean latent tokens and per-example JSONL on a dataset")
    _model_args(p)
    p.add_argument(
        "--method",
        default=None,
        help="decoding method (default: the checkpoint's own); soft_thinking works on any checkpoint",
    )
    p.add_argument(
        "--method-option",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="method option, e.g. soft_thinking.cold_stop_steps=8 (repeatable)",
    )
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="one or more of: gsm8k, svamp, asdiv (from $LTSCALE_DATA_DIR), multiarith (hub, online), "
        "all (= gsm8k svamp asdiv), a JSONL/JSON file, or a hub dataset name",
    )
    p.add_argument("--split", default=None)
    p.add_argument(
        "--output",
        default="results.json",
        help="summary JSON; examples go to <stem>.examples.jsonl (<stem>.<benchmark>.examples.jsonl for several)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--limit", type=_positive_int, default=None, help="evaluate only the first N records")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="latent tokens vs difficulty, entropy/attention, feature collapse")
    p.add_argument(
        "--checkpoint", required=True, help="HF dir, stage dir (uses hf/) or run dir (highest stage)"
    )
    p.add_argument(
        "--data", required=True, help="a benchmark name (gsm8k, svamp, asdiv, multiarith) or a file"
    )
    p.add_argument("--split", default=None)
    p.add_argument(
        "--limit", type=_positive_int, default=100, help="problems to trace (default 100, as the paper)"
    )
    p.add_argument("--output-dir", default="analysis", help="analysis.json and the PNG figures go here")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
    p.add_argument(
        "--probe-steps", type=int, default=6, help="forced latent steps for the collapse probe (0: off)"
    )
    p.add_argument(
        "--examples", default=None, help="eval examples JSONL: difficulty analysis over it instead"
    )
    p.add_argument("--no-attention", action="store_true", help="skip attention capture (keeps sdpa; faster)")
    p.add_argument("--mode", choices=["hidden", "fusion", "pause"], default=None)
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("report", help="Markdown results table from run dirs (mean ± std over seeds)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run dirs (several seeds of a method: one row)")
    p.add_argument("--metric", choices=["official", "numeric"], default="official")
    p.add_argument("--output", default=None, help="also write the Markdown here")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("generate", help="answer one question, showing the latent steps")
    _model_args(p)
    p.add_argument("question")
    p.add_argument(
        "--marker", default="\u27e8latent\u27e9", help="how a latent step is shown (default: ⟨latent⟩)"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="consolidate a ZeRO checkpoint offline into an HF save_pretrained dir")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run dir (highest finished stage, or --stage), stage dir, stage<N>/ckpt, or one tag dir",
    )
    p.add_argument("--output", required=True, help="HF dir to write (only an earlier export is replaced)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. final or step-000200 (default: latest)")
    p.add_argument("--stage", type=_positive_int, default=None, help="stage number (with a run dir)")
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="weights dtype (default: the training precision, as the stage's own hf export)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", help="train and score every method on the tiny default; one table")
    p.add_argument("--out", default="runs/compare", help="run dirs, compare.md and compare.json go here")
    p.add_argument("--methods", default=None, help="comma list (default: all; cot is always trained first)")
    p.add_argument("--nproc", type=_positive_int, default=2, help="ranks per training run (torchrun)")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (model.* only for the CoT run)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("env", help="versions, accelerator, MPI, extension and env vars (like ds_report)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("data", help="synthetic data and record validation")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{synth,check}")
    q = dsub.add_parser("synth", help="write seeded synthetic arithmetic problems as JSONL")
    q.add_argument("--n", type=_positive_int, required=True)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_data_synth)
    q = dsub.add_parser("check", help="validate a record file (strict); print the count or the error")
    q.add_argument("file")
    q.add_argument("--split", default=None)
    q.set_defaults(func=cmd_data_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ltscale`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage; keep main() returning an int
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    from ltscale.logging_setup import setup_logging

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args))
    except UserError as e:
        print(f"ltscale: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ltscale: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
