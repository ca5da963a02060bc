"""``ltscale plan``: per-GPU memory, steps and time of a run, before it is submitted.

``estimate`` holds the arithmetic (model states, activations, step time; its docstring gives the
formulas), ``report`` reads the inputs (run config, the model's ``config.json``, the data) and
prints the report. Pure Python over the config: no model is built and DeepSpeed is not imported.
"""

from ltscale.plan.estimate import (
    GIB,
    GPUS,
    STRATEGIES,
    Arch,
    Hardware,
    Option,
    Plan,
    activation_memory,
    evaluate,
    layer_bytes_per_token,
    model_states,
    stage_loads,
    step_seconds,
)
from ltscale.plan.report import count_examples, format_plan, load_arch, parse_memory, plan_run

__all__ = [
    "GIB",
    "GPUS",
    "STRATEGIES",
    "Arch",
    "Hardware",
    "Option",
    "Plan",
    "activation_memory",
    "count_examples",
    "evaluate",
    "format_plan",
    "layer_bytes_per_token",
    "load_arch",
    "model_states",
    "parse_memory",
    "plan_run",
    "stage_loads",
    "step_seconds",
]
