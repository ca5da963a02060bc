"""``ltscale eval``: accuracy, mean latent tokens and per-example JSONL of one checkpoint on one or
several benchmarks, sharded over launcher ranks.

One ``--data`` source writes the single-summary JSON (``<stem>.examples.jsonl`` beside it);
several write ``{"benchmarks": {...}, "average": {...}}`` with one examples file per benchmark.
Under ``torchrun``/``deepspeed``/``mpirun`` each rank evaluates its exact shard and rank 0 gathers,
summarises and writes; a plain ``ltscale eval`` never touches ``torch.distributed``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ltscale.cli import common
from ltscale.eval.benchmarks import (
    benchmark_name,
    expand_sources,
    suite_average,
    suite_examples_path,
    write_suite_results,
)
from ltscale.eval.evaluate import (
    evaluate,
    examples_path,
    format_table,
    merge_results,
    summarize,
    write_results,
)
from ltscale.launch_env import LaunchEnvError, rank_env


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy, mean latent tokens and per-example JSONL on a dataset")
    common.add_checkpoint_args(p)
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
    p.add_argument("--batch-size", type=common.positive_int, default=16)
    p.add_argument(
        "--limit", type=common.positive_int, default=None, help="evaluate only the first N records"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _dist_context() -> tuple[int, int, int]:
    """(rank, world_size, local_rank): joins the process group only when launched with several ranks
    (torchrun/deepspeed, mpirun, PMI, srun: ``ltscale.launch_env``)."""
    try:
        world = rank_env().world_size
    except LaunchEnvError as e:
        raise common.UserError(str(e)) from None
    if world <= 1:
        return 0, 1, 0
    from ltscale.engine.dist import init_distributed  # noqa: PLC0415 - torch.distributed: launched runs only

    info = init_distributed()
    return info.rank, info.world_size, info.local_rank


def run(args: argparse.Namespace) -> int:
    ckpt = common.checkpoint_arg(args.checkpoint)
    datasets = {}
    for source in expand_sources(args.data):  # all data errors surface before the model is loaded
        datasets[benchmark_name(source)] = (
            source,
            common.load_benchmark_arg(source, split=args.split, limit=args.limit),
        )
    rank, world, local_rank = _dist_context()

    inf = common.load_inference(args, ckpt, local_rank=local_rank)
    results = {}
    for name, (_, records) in datasets.items():
        if rank == 0 and len(datasets) > 1:
            common.logger.info("benchmark %s: %d problems", name, len(records))
        summary, per_example = evaluate(
            inf,
            records,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            without_thinking=args.without_thinking,
            progress=not args.no_progress,
            rank=rank,
            world_size=world,
        )
        if world > 1:
            from ltscale.engine.dist import all_gather_object  # noqa: PLC0415

            per_example = merge_results(all_gather_object(per_example))
            summary = summarize(per_example)
        results[name] = (summary, per_example)
    if rank != 0:
        return common.EXIT_OK
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
    _write_and_print(results, Path(args.output), meta, ckpt)
    return common.EXIT_OK


def _write_and_print(results: dict, output: Path, meta: dict, ckpt: Path) -> None:
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
        avg = suite_average({n: s for n, (s, _) in results.items()})
        print(
            f"\naverage over {len(results)} benchmarks: accuracy={100 * avg['accuracy_official']:.2f}%  "
            f"numeric={100 * avg['accuracy_numeric']:.2f}%  mean latent tokens={avg['mean_latent_tokens']:.2f}"
        )
    print(f"\nwrote {output} and {', '.join(str(p) for p in written)}")
