"""``ltscale plan``: per-GPU memory, steps and time of a run before it is submitted.

Thin: the arithmetic lives in ``ltscale.plan``. Exit 1 when the run as configured will not fit
(the report is printed either way), like ``data check`` reports a validation result.
"""

from __future__ import annotations

import argparse

from ltscale.cli import common
from ltscale.config import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-GPU memory, steps and time of a run before it is submitted")
    p.add_argument(
        "--config", required=True, help="run config YAML (e.g. configs/paper/llama-3.1-8b-instruct.yaml)"
    )
    p.add_argument("--nodes", type=common.positive_int, default=1)
    p.add_argument("--gpus-per-node", type=common.positive_int, default=8)
    p.add_argument(
        "--gpu-memory", default=None, help="per GPU, e.g. 80GB (binary units; default: the --gpu's)"
    )
    p.add_argument(
        "--gpu", default="a100", help="a100 | h100 | h200: peak bf16 FLOP/s, HBM bandwidth, memory"
    )
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the step time assumes")
    p.add_argument(
        "--seq-len",
        type=common.positive_int,
        default=None,
        help="tokens per row for memory (data.max_length)",
    )
    p.add_argument(
        "--mean-tokens", type=common.positive_int, default=None, help="tokens per row for time (seq-len / 2)"
    )
    p.add_argument(
        "--examples", type=common.positive_int, default=None, help="training examples (counted when local)"
    )
    p.add_argument("--model-config", default=None, help="an HF config.json (or its dir) instead of the hub's")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.micro_batch_size=4")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ltscale.plan import format_plan, plan_run  # noqa: PLC0415 - transformers (the model's config)
    from ltscale.run_config import load_config  # noqa: PLC0415 - the method registry

    try:
        cfg = load_config(args.config, args.overrides)
        p = plan_run(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory=args.gpu_memory,
                     gpu=args.gpu, mfu=args.mfu, seq_len=args.seq_len, mean_tokens=args.mean_tokens,
                     examples=args.examples, model_config=args.model_config)  # fmt: skip
    except (ConfigError, OSError) as e:
        raise common.UserError(str(e)) from None
    print(format_plan(p, f"{args.config} {' '.join(args.overrides)}".strip()))
    return common.EXIT_OK if p.configured.peak <= p.hw.usable else 1
