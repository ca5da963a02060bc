"""The model-facing ``ltscale`` subcommands: ``eval``, ``analyze``, ``report``, ``generate``.

Called by ``ltscale.cli.main`` with the parsed arguments; each returns its exit code and raises
:class:`ltscale.cli_common.UserError` for bad input.  Heavy imports (torch, transformers, the
model package) stay inside the functions, after the arguments were checked, so bad input fails
fast and tests can swap ``ltscale.model.io`` in ``sys.modules``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ltscale.cli_common import EXIT_OK, UserError, checkpoint_arg, load_records_arg

logger = logging.getLogger("ltscale.cli")


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
        return load_records_arg(source, split=split, limit=limit)
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

    ckpt = checkpoint_arg(args.checkpoint)
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
            raise UserError(
                f"--method-option {item!r}: expected SECTION.KEY=VALUE, e.g. soft_thinking.top_k=5"
            )
        options.setdefault(section, {})[field] = parse_yaml(text)
    try:
        return inference_for(
            model, tokenizer, ckpt, method=args.method, chat=args.chat_template, options=options
        )
    except (ConfigError, TypeError, ValueError) as e:
        raise UserError(f"--method: {e}") from None


def cmd_analyze(args: argparse.Namespace) -> int:
    """The paper's analyses on one checkpoint: numbers in ``analysis.json`` plus three PNG figures."""
    ckpt = checkpoint_arg(args.checkpoint)
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
    ckpt = checkpoint_arg(args.checkpoint)
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
