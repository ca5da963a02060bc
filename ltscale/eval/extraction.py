"""Answer extraction and correctness for math word problems.

Two metrics are kept side by side on purpose:

* **official** (:func:`extract_answer` + :func:`official_correct`) reproduces the LT-Tuning /
  Coconut evaluator bit for bit: take the text after the last ``#``, remove commas and the
  ``<thinking>`` marker, strip, and compare as *strings* with the gold answer (commas removed).
  Numbers reported with this metric are comparable with the paper's tables.
* **numeric** (:func:`numeric_correct`) parses the first number of the extracted answer and
  compares values, so ``18.0`` == ``18``, ``$18.`` == ``18`` and ``3/4`` == ``0.75``. It is
  non-standard (documented as such in reports) but separates "wrong answer" from "right answer in
  the wrong format" — the official rule is known to be fragile (docs/method.md §11.20).

One deliberate extension of the official rule: EOS-like special-token strings (``</s>``,
``<|im_end|>``, ``<|eot_id|>`` …) at the *end* of the extracted text are dropped. The official
decoder never appends EOS (generation stops on it), but a tokenizer whose chat template ends turns
with a different token than ``eos_token_id`` leaks that token into the decoded text; without this
a correct ``#### 18<|eot_id|>`` would be scored wrong. The extension can only turn a string that
ends in such a token into one that does not, so it never changes a result the official code would
score correct.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "EOS_LIKE_TOKENS",
    "THINKING_TOKEN",
    "extract_answer",
    "numeric_correct",
    "official_correct",
    "parse_number",
]

#: The marker a latent step is decoded as (the token LT-Tuning adds to the vocabulary).
THINKING_TOKEN = "<thinking>"

#: End-of-sequence / end-of-turn strings of common tokenizers (Llama 2/3, Qwen/ChatML, GPT-2,
#: Gemma, SmolLM2). Only removed when they trail the extracted answer.
EOS_LIKE_TOKENS: tuple[str, ...] = (
    "</s>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
    "<eos>",
    "<end_of_turn>",
    "<pad>",
    "[PAD]",
)

# A number: optional sign, digits (thousands commas allowed between digit groups), optional
# decimals, or a bare ".5"; optionally followed by "/denominator" for simple fractions.
_NUMBER_RE = re.compile(
    r"(?P<sign>(?<![\w.])-)?\s*\$?\s*(?P<num>\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*(?P<den>\d[\d,]*(?:\.\d+)?))?"
)
_MINUS_LIKE = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-"})


def _strip_trailing_eos(text: str) -> str:
    """Remove any run of EOS-like token strings (and whitespace) from the end of ``text``."""
    changed = True
    while changed:
        changed = False
        text = text.rstrip()
        for tok in EOS_LIKE_TOKENS:
            if text.endswith(tok):
                text = text[: -len(tok)]
                changed = True
    return text


def extract_answer(text: str, thinking_token: str = THINKING_TOKEN) -> str:
    """Extract the final answer from generated text with the official LT-Tuning rule.

    ``text.split("#")[-1]`` with commas and ``thinking_token`` removed, stripped. Text without any
    ``#`` is returned whole (stripped): the official evaluator does the same, so a model that never
    writes ``#### N`` scores as wrong unless its entire output is the answer. Trailing EOS-like
    special tokens are dropped (see the module docstring for why this does not change official
    results).
    """
    if not text:
        return ""
    answer = text.split("#")[-1]
    answer = answer.replace(",", "")
    if thinking_token:
        answer = answer.replace(thinking_token, "")
    return _strip_trailing_eos(answer).strip()


def official_correct(pred: str, gold: str) -> bool:
    """Official metric: exact string equality after removing commas (and surrounding whitespace).

    An empty prediction is never correct, even against an (invalid) empty gold answer.
    """
    p = pred.replace(",", "").strip()
    g = gold.replace(",", "").strip()
    return bool(p) and p == g


def parse_number(text: str) -> float | None:
    """Parse the first number in ``text``; ``None`` when there is none.

    Handles ``$``, thousands commas, a trailing period (``18.`` → 18), negatives (ASCII and
    Unicode minus), decimals, ``.5`` and simple fractions ``3/4``. A fraction with a zero
    denominator is not a number (returns ``None``) rather than silently reading the numerator.
    """
    if not text:
        return None
    m = _NUMBER_RE.search(text.translate(_MINUS_LIKE))
    if m is None:
        return None
    value = float(m.group("num").replace(",", ""))
    den = m.group("den")
    if den is not None:
        d = float(den.replace(",", ""))
        if d == 0:
            return None
        value /= d
    return -value if m.group("sign") else value


def numeric_correct(pred: str, gold: str, *, rel_tol: float = 1e-6) -> bool:
    """Numeric metric: first number of ``pred`` equals the gold value within ``rel_tol``.

    The gold answer is parsed with the same rule; when the gold has no number (non-numeric
    datasets), this falls back to :func:`official_correct` so the metric is still defined.
    A tiny absolute tolerance keeps a gold of ``0`` comparable (``rel_tol`` alone never matches 0).
    """
    g = parse_number(gold)
    if g is None:
        return official_correct(pred, gold)
    p = parse_number(pred)
    if p is None:
        return False
    return math.isclose(p, g, rel_tol=rel_tol, abs_tol=1e-9)
