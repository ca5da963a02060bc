"""Evaluation: answer extraction (official + numeric metrics) and batched latent-model evaluation.

Modules: ``extraction`` (answer rules), ``evaluate`` (sharded batched decoding and scoring),
``benchmarks`` (gsm8k / svamp / asdiv / multiarith by name, several-benchmark summaries),
``analysis`` (difficulty, entropy/attention and collapse numbers), ``plots`` (their figures),
``report`` (the Markdown results table of ``ltscale report``).

The extraction helpers are imported eagerly (pure Python); the evaluation loop, which needs torch,
is resolved lazily so ``from ltscale.eval import extract_answer`` stays cheap. The evaluation
function itself is imported as ``from ltscale.eval.evaluate import evaluate``: its name is also
the submodule's, so the package attribute ``ltscale.eval.evaluate`` is (and stays) the module.
"""

from __future__ import annotations

from typing import Any

from ltscale.eval.extraction import (
    THINKING_TOKEN,
    extract_answer,
    numeric_correct,
    official_correct,
    parse_number,
)

_LAZY = {
    "EvalSummary",
    "summarize",
    "merge_results",
    "write_results",
    "format_table",
    "decode_generated",
    "examples_path",
}

__all__ = [
    "THINKING_TOKEN",
    "extract_answer",
    "numeric_correct",
    "official_correct",
    "parse_number",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from ltscale.eval import evaluate as _evaluate_module

        return getattr(_evaluate_module, name)
    raise AttributeError(f"module 'ltscale.eval' has no attribute {name!r}")
