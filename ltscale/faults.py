"""Fault injection at named points, for the reliability tests (``tests/reliability``).

Why in the product: killing a process "somewhere during a checkpoint write" from outside is a
race; a named point inside the code makes every fault deterministic and cheap to reproduce.
The trainer and the checkpoint code call :func:`check` at a handful of places; with the
environment variable unset (every real run) that is one dictionary lookup and nothing else.

``LTSCALE_FAULT`` is a comma-separated list of ``action:point:hits[@rank]``:

* ``action``: ``kill`` (SIGKILL this process: a node loss / OOM kill, no cleanup), ``exit``
  (``os._exit(17)``: a rank that crashes without raising), ``hang`` (sleep forever: a stuck rank),
  ``slow<seconds>`` (sleep that long, then go on: a slow file system under an export or a
  checkpoint, e.g. ``slow20``), ``nan`` / ``inf`` (``check`` returns the value and the caller
  poisons its loss or gradient);
* ``point``: a name passed to :func:`check`, optionally qualified by stage (``step.s2`` fires only
  in stage 2; ``step`` in any stage);
* ``hits``: the n-th time this process reaches the point (``3``), or a range (``3-5``, ``3-``);
* ``@rank``: only on that global rank (default: every rank).

Example: ``LTSCALE_FAULT=kill:ckpt_before_commit:2,nan:loss.s1:3@1``.

Points (grep ``faults.check``): ``step`` (after backward, before the optimizer step), ``loss``
and ``grad`` (poisoned loss / gradient), ``score`` (each confidence-scoring batch),
``stage_end`` (after a stage's final checkpoint, before its export), ``export`` (rank 0, before
it writes a stage's export), ``analysis`` (rank 0, before a stage's analyses), ``ckpt_written`` (all
shard files written, no manifest yet), ``ckpt_before_commit`` (manifest written, before the
rename), ``ckpt_before_latest`` (renamed, ``latest`` not yet updated).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

from ltscale.launch_env import rank_env

log = logging.getLogger(__name__)

ENV = "LTSCALE_FAULT"
ACTIONS = ("kill", "exit", "hang", "nan", "inf", "slow<seconds>")
EXIT_CODE = 17

__all__ = ["ENV", "FaultSpec", "check", "parse", "poison_loss", "reset"]


@dataclass(frozen=True)
class FaultSpec:
    action: str
    point: str
    first: int
    last: int | None  # None: every hit from `first` on
    rank: int | None

    def matches(self, names: tuple[str, ...], hit: int, rank: int) -> bool:
        return (
            self.point in names
            and hit >= self.first
            and (self.last is None or hit <= self.last)
            and (self.rank is None or self.rank == rank)
        )


def parse(text: str) -> list[FaultSpec]:
    """``LTSCALE_FAULT`` -> specs; a malformed entry is an error naming it (a typo must not
    silently turn a fault test into a clean run)."""
    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        body, _, rank = item.partition("@")
        parts = body.split(":")
        if len(parts) != 3 or not _known_action(parts[0]) or not parts[1]:
            raise ValueError(
                f"{ENV}: bad entry {item!r}; expected action:point:hits[@rank], action in {ACTIONS}"
            )
        action, point, hits = parts
        lo, dash, hi = hits.partition("-")
        try:
            first = int(lo)
            last = (int(hi) if hi else None) if dash else first
            rank_n = int(rank) if rank else None
        except ValueError:
            raise ValueError(f"{ENV}: bad hit count or rank in {item!r}") from None
        if first < 1 or (last is not None and last < first):
            raise ValueError(f"{ENV}: hits in {item!r} must be >= 1 (n, n-m or n-)")
        specs.append(FaultSpec(action, point, first, last, rank_n))
    return specs


def _known_action(action: str) -> bool:
    if action.startswith("slow"):
        try:
            return float(action[len("slow") :]) >= 0
        except ValueError:
            return False
    return action in ACTIONS


class _State:
    """Parsed specs and per-point hit counters of this process (one injector per process)."""

    def __init__(self) -> None:
        self.text: str | None = None
        self.specs: list[FaultSpec] = []
        self.hits: dict[str, int] = {}


_STATE = _State()


def reset() -> None:
    """Forget hit counts and re-read the environment (tests)."""
    global _STATE
    _STATE = _State()


def check(point: str, *, stage: int | None = None) -> float | None:
    """Count a hit of ``point``; perform a matching kill/exit/hang/slow fault, or return NaN/inf for a
    matching ``nan``/``inf`` fault (the caller poisons its value). None when nothing fires."""
    text = os.environ.get(ENV)
    if not text:
        return None
    st = _STATE
    if st.text != text:
        st.text, st.specs, st.hits = text, parse(text), {}
    names = (point,) if stage is None else (point, f"{point}.s{stage}")
    fired: float | None = None
    rank = rank_env().rank
    for name in names:
        st.hits[name] = hit = st.hits.get(name, 0) + 1
        for spec in st.specs:
            if spec.point != name or not spec.matches(names, hit, rank):
                continue
            msg = f"ltscale fault injection: {spec.action} at {name} hit {hit} (rank {rank})"
            print(msg, file=sys.stderr, flush=True)
            if spec.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if spec.action == "exit":
                os._exit(EXIT_CODE)
            if spec.action == "hang":
                while True:
                    time.sleep(3600)
            if spec.action.startswith("slow"):
                time.sleep(float(spec.action[len("slow") :]))
                continue
            log.warning(msg)
            fired = math.nan if spec.action == "nan" else math.inf
    return fired


def poison_loss(loss, *, stage: int | None = None):
    """The ``loss`` and ``grad`` points: a NaN/inf loss, or a finite loss whose gradient is NaN/inf."""
    value = check("loss", stage=stage)
    if value is not None:
        loss = loss * value
    value = check("grad", stage=stage)
    if value is not None:
        loss = _poison_grad(loss, value)
    return loss


def _poison_grad(loss, value: float):
    import torch  # only reached under fault injection

    class PoisonGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * value

    return PoisonGrad.apply(loss)
