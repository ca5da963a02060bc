"""TensorBoard monitoring, written by global rank 0 only.

Call sites never check the rank: every rank builds a :class:`Monitor`, non-main ranks get a disabled
one whose methods are no-ops and which never creates a file (only rank 0 may own an
``events.out.tfevents.*`` file, otherwise TensorBoard shows duplicate curves). Metric reduction
across ranks (all-reduce mean / max) happens in ``ltscale.engine`` before values reach here, because
``engine`` is the only package that talks to ``torch.distributed``.

Conventions (docs/conventions.md §1): HF-style prefixes (``train/loss``, ``eval/accuracy``,
``perf/…``), x-axis = global optimizer step, monotonic across stages. On resume pass
``purge_step=resumed_step``: TensorBoard then hides events at steps >= ``purge_step`` written by
the crashed run, so curves do not zig-zag.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["Monitor", "read_scalars", "read_tags"]

logger = logging.getLogger(__name__)


def _to_float(value: Any) -> float:
    """Accept Python numbers, numpy scalars and 0-d / 1-element tensors."""
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


class Monitor:
    """Thin rank-aware wrapper around ``torch.utils.tensorboard.SummaryWriter``.

    ``Monitor(log_dir, enabled=is_main_rank, purge_step=resumed_step)``. A monitor with
    ``enabled=False`` or ``log_dir=None`` does nothing at all. Usable as a context manager.
    """

    def __init__(self, log_dir: Path | str | None, *, enabled: bool, purge_step: int | None = None) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.enabled = bool(enabled) and self.log_dir is not None
        self._writer: Any = None
        self._warned_nonfinite: set[str] = set()
        if self.enabled:
            # Imported lazily: disabled monitors (non-main ranks, tests) never pay for tensorboard.
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
            logger.info("TensorBoard logs in %s (purge_step=%s)", self.log_dir, purge_step)

    @classmethod
    def for_rank(cls, log_dir: Path | str | None, rank: int, *, purge_step: int | None = None) -> Monitor:
        """Enabled on global rank 0, disabled elsewhere."""
        return cls(log_dir, enabled=rank == 0, purge_step=purge_step)

    @property
    def active(self) -> bool:
        """True while this monitor writes (enabled and not closed)."""
        return self._writer is not None

    def scalar(self, tag: str, value: Any, step: int) -> None:
        """Log one scalar. Non-finite values are logged (TensorBoard shows them) and warned once per tag."""
        if self._writer is None:
            return
        v = _to_float(value)
        if not math.isfinite(v) and tag not in self._warned_nonfinite:
            self._warned_nonfinite.add(tag)
            logger.warning("non-finite value %r for %s at step %d", v, tag, step)
        self._writer.add_scalar(tag, v, global_step=int(step))

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        """Log several scalars at one step, each under its own tag.

        Deliberately not ``SummaryWriter.add_scalars``, which creates one sub-run directory per key.
        """
        if self._writer is None:
            return
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def figure(self, tag: str, fig: Any, step: int) -> None:
        """Log a matplotlib figure (closed afterwards, so long runs do not leak figures)."""
        if self._writer is None:
            return
        self._writer.add_figure(tag, fig, global_step=int(step), close=True)

    def text(self, tag: str, text: str, step: int) -> None:
        """Log a text/Markdown snippet (e.g. the resolved config or the end-of-run eval table)."""
        if self._writer is None:
            return
        self._writer.add_text(tag, text, global_step=int(step))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close; later calls are no-ops (safe to call twice)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Monitor(log_dir={self.log_dir!s}, active={self.active})"


def read_scalars(log_dir: Path | str) -> dict[str, list[tuple[int, float]]]:
    """Read every scalar series from the event files directly in ``log_dir``.

    Returns ``{tag: [(step, value), ...]}`` in step order, with purged steps (``purge_step`` on
    resume) already removed by TensorBoard's ``EventAccumulator``. All events are kept (no
    reservoir sampling), which is what tests and small post-hoc analyses want.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise FileNotFoundError(f"no TensorBoard log directory at {log_dir}")
    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    out: dict[str, list[tuple[int, float]]] = {}
    for tag in acc.Tags().get("scalars", []):
        events = sorted(acc.Scalars(tag), key=lambda e: e.step)
        out[tag] = [(int(e.step), float(e.value)) for e in events]
    return out


def read_tags(log_dir: Path | str) -> dict[str, list[str]]:
    """Every tag in the event files of ``log_dir`` by kind (``scalars``, ``images``, ``tensors`` …).

    ``add_figure`` images appear under ``images``; tests use this to check what a run logged.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise FileNotFoundError(f"no TensorBoard log directory at {log_dir}")
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {kind: sorted(tags) for kind, tags in acc.Tags().items() if isinstance(tags, list)}
