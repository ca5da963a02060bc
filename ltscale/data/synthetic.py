"""Seeded multi-step arithmetic word problems: the data of the embedded default run.

The default run (`make run`) must show the whole LT-Tuning curriculum working on 2 CPU cores in
minutes, with a ~1M-parameter Llama and no downloaded data. So the problems are built to be
learnable by such a model: a small templated vocabulary (8 names, 8 objects, 2-3 phrasings per
operation), small numbers (operands 1..20, every intermediate result in 0..99, no negatives,
division only when exact), and GSM8K-Aug style equation steps where every step starts from the
previous result (``"5+3=8"``, ``"8*2=16"``), so the only thing to learn per step is one small
operation. Difficulty is the number of steps, the paper's difficulty axis (docs/method.md §10.2).

Randomness comes only from :meth:`random.Random.random` on an integer- or string-seeded
generator: Python guarantees that stream across versions (unlike ``randint``/``choice`` or numpy's
``Generator`` methods), so a seed names the same dataset on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from .records import Record

__all__ = ["generate_problems", "synthetic_splits"]

MAX_VALUE = 99
MAX_OPERAND = 20
MAX_FACTOR = 5  # multiplier / divisor range 2..5 keeps products small and steps learnable


@dataclass(frozen=True)
class _Ranges:
    max_value: int = MAX_VALUE
    max_operand: int = MAX_OPERAND
    max_factor: int = MAX_FACTOR

_NAMES = (
    ("Tom", "He"),
    ("Ann", "She"),
    ("Ben", "He"),
    ("Mia", "She"),
    ("Sam", "He"),
    ("Lily", "She"),
    ("Max", "He"),
    ("Zoe", "She"),
)
_OBJECTS = (
    ("apple", "apples"),
    ("book", "books"),
    ("pen", "pens"),
    ("card", "cards"),
    ("ball", "balls"),
    ("coin", "coins"),
    ("egg", "eggs"),
    ("shell", "shells"),
)
_PHRASES = {
    "+": ("{P} buys {n} more.", "{P} finds {n} more.", "{P} gets {n} more."),
    "-": ("{P} gives away {n}.", "{P} loses {n}.", "{P} sells {n}."),
    "*": ("{P} ends up with {n} times as many.",),
    "/": ("{P} splits them into {n} equal groups and keeps one group.",),
}


@dataclass(frozen=True)
class _Problem:
    question: str
    steps: tuple[str, ...]
    answer: int


def _randint(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] from ``rng.random()`` only (version-stable, see module doc)."""
    return lo + min(int(rng.random() * (hi - lo + 1)), hi - lo)


def _pick(rng: random.Random, seq):
    return seq[_randint(rng, 0, len(seq) - 1)]


def _feasible_ops(r: int, rg: _Ranges = _Ranges()) -> list[str]:
    """Operations that keep the result in 0..max_value with an operand in range."""
    ops = []
    if r < rg.max_value:
        ops.append("+")
    if r >= 1:
        ops.append("-")
    if r >= 1 and 2 * r <= rg.max_value:
        ops.append("*")
    if any(r % b == 0 for b in range(2, min(rg.max_factor, r) + 1)):
        ops.append("/")
    return ops


def _apply(rng: random.Random, r: int, op: str, rg: _Ranges = _Ranges()) -> tuple[int, int]:
    """Draw an operand for ``op`` on ``r`` -> (operand, result)."""
    if op == "+":
        b = _randint(rng, 1, min(rg.max_operand, rg.max_value - r))
        return b, r + b
    if op == "-":
        b = _randint(rng, 1, min(rg.max_operand, r))
        return b, r - b
    if op == "*":
        b = _randint(rng, 2, min(rg.max_factor, rg.max_value // r))
        return b, r * b
    divisors = [b for b in range(2, min(rg.max_factor, r) + 1) if r % b == 0]
    b = _pick(rng, divisors)
    return b, r // b


def _make_problem(rng: random.Random, n_steps: int, rg: _Ranges = _Ranges()) -> _Problem:
    name, pronoun = _pick(rng, _NAMES)
    singular, plural = _pick(rng, _OBJECTS)
    r = _randint(rng, 1, rg.max_operand)
    sentences = [f"{name} has {r} {singular if r == 1 else plural}."]
    steps = []
    for _ in range(n_steps):
        op = _pick(rng, _feasible_ops(r, rg))
        b, result = _apply(rng, r, op, rg)
        sentences.append(_pick(rng, _PHRASES[op]).format(P=pronoun, n=b))
        steps.append(f"{r}{op}{b}={result}")
        r = result
    sentences.append(f"How many {plural} does {name} have now?")
    return _Problem(question=" ".join(sentences), steps=tuple(steps), answer=r)


def _stream(rng: random.Random, min_steps: int, max_steps: int,
            rg: _Ranges = _Ranges()) -> Iterator[tuple[_Problem, int]]:
    if rg.max_operand < 1 or rg.max_value < rg.max_operand or rg.max_factor < 2:
        raise ValueError(f"need 1 <= max_operand <= max_value and max_factor >= 2, got {rg}")
    while True:
        k = _randint(rng, min_steps, max_steps)
        yield _make_problem(rng, k, rg), k


def _check_args(n: int, min_steps: int, max_steps: int) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0 <= min_steps <= max_steps:
        raise ValueError(
            f"need 0 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}"
        )


def _to_record(p: _Problem, k: int, rid: str) -> Record:
    return Record(id=rid, question=p.question, steps=p.steps, answer=str(p.answer), extra={"difficulty": k})


def generate_problems(
    n: int,
    *,
    seed: int,
    min_steps: int = 1,
    max_steps: int = 5,
    id_prefix: str = "syn",
    max_value: int = MAX_VALUE,
    max_operand: int = MAX_OPERAND,
) -> list[Record]:
    """``n`` problems whose step count is uniform in [min_steps, max_steps]; deterministic per seed.

    Ids are ``{id_prefix}-{i:05d}``; ``extra["difficulty"]`` repeats the step count so it
    survives a JSONL round trip and can be grouped on in eval without recounting.
    """
    _check_args(n, min_steps, max_steps)
    stream = _stream(random.Random(seed), min_steps, max_steps, _Ranges(max_value, max_operand))
    return [_to_record(p, k, f"{id_prefix}-{i:05d}") for i, (p, k) in zip(range(n), stream)]


def _unique(stream: Iterator[tuple[_Problem, int]], n: int, exclude: set[str], what: str) -> list:
    """First ``n`` problems of ``stream`` whose question is new (not excluded, not repeated)."""
    out: list[tuple[_Problem, int]] = []
    seen = set(exclude)
    for attempts, (p, k) in enumerate(stream):
        if len(out) >= n:
            break
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct {what} problems; widen the step range or lower n")
        if p.question not in seen:
            seen.add(p.question)
            out.append((p, k))
    return out


def synthetic_splits(
    n_train: int,
    n_test: int,
    seed: int,
    *,
    min_steps: int = 1,
    max_steps: int = 5,
    max_value: int = MAX_VALUE,
    max_operand: int = MAX_OPERAND,
) -> tuple[list[Record], list[Record]]:
    """Train and test sets with no question text in common (and no repeats within test).

    The two splits come from separately seeded streams, so the test set depends only on
    (n_test, seed), not on n_train: growing the training set never changes what is evaluated.
    Train problems whose question appears in test are dropped and replaced by later draws.
    ``max_value``/``max_operand`` bound every intermediate result / added or subtracted operand
    (smaller numbers: an easier task for a tinier model).
    """
    rg = _Ranges(max_value, max_operand)
    _check_args(n_train, min_steps, max_steps)
    _check_args(n_test, min_steps, max_steps)
    test_stream = _stream(random.Random(f"ltscale-synthetic-test-{seed}"), min_steps, max_steps, rg)
    test = _unique(test_stream, n_test, set(), "test")
    test_questions = {p.question for p, _ in test}
    train_rng = random.Random(f"ltscale-synthetic-train-{seed}")
    train = []
    for attempts, (p, k) in enumerate(_stream(train_rng, min_steps, max_steps, rg)):
        if len(train) >= n_train:
            break
        if attempts > 50 * n_train + 1000:
            raise ValueError("cannot draw enough training problems disjoint from the test set")
        if p.question not in test_questions:
            train.append((p, k))
    return (
        [_to_record(p, k, f"syn-train-{i:05d}") for i, (p, k) in enumerate(train)],
        [_to_record(p, k, f"syn-test-{i:05d}") for i, (p, k) in enumerate(test)],
    )
