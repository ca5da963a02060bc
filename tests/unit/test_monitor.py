"""Monitor: rank-0 TensorBoard writing, disabled no-op monitors, purge_step on resume, read-back."""

from __future__ import annotations

import time

import pytest
import torch

from ltscale.monitor import Monitor, read_scalars, read_tags


def _event_files(path) -> list:
    return sorted(path.rglob("events.out.tfevents.*"))


def test_writes_and_reads_back(tmp_path) -> None:
    with Monitor(tmp_path / "tb", enabled=True) as mon:
        assert mon.active
        for step in range(3):
            mon.scalar("train/loss", 1.0 / (step + 1), step)
        mon.scalars({"eval/accuracy": torch.tensor(0.5), "perf/tokens_per_sec": 123}, step=2)
        mon.text("config", "lr: 1e-4", step=0)
        mon.flush()
    assert not mon.active
    mon.close()  # closing twice is fine
    mon.scalar("train/loss", 9.0, 99)  # after close: a no-op, not an error
    got = read_scalars(tmp_path / "tb")
    assert got["train/loss"] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert got["eval/accuracy"] == [(2, 0.5)]
    assert got["perf/tokens_per_sec"] == [(2, 123.0)]
    # scalars() must not create one sub-run directory per key (add_scalars would)
    assert [p.parent for p in _event_files(tmp_path / "tb")] == [tmp_path / "tb"]


@pytest.mark.parametrize(
    "make",
    [
        lambda d: Monitor(d, enabled=False),
        lambda d: Monitor.for_rank(d, rank=1),
        lambda d: Monitor(None, enabled=True),
    ],
)
def test_disabled_monitor_writes_nothing(tmp_path, make) -> None:
    log_dir = tmp_path / "tb"
    mon = make(log_dir)
    assert not mon.active
    mon.scalar("train/loss", 1.0, 0)
    mon.scalars({"a": 1.0}, 0)
    mon.text("t", "x", 0)
    mon.figure("f", object(), 0)
    mon.flush()
    mon.close()
    assert not log_dir.exists()


def test_rank0_is_enabled(tmp_path) -> None:
    mon = Monitor.for_rank(tmp_path / "tb", rank=0)
    mon.scalar("x", 1, 0)
    mon.close()
    assert len(_event_files(tmp_path / "tb")) == 1


def test_purge_step_hides_steps_of_crashed_run(tmp_path) -> None:
    log_dir = tmp_path / "tb"
    with Monitor(log_dir, enabled=True) as mon:
        for step in range(8):
            mon.scalar("train/loss", float(step), step)
    # Event file names carry a 1 s timestamp; a new second keeps the resumed file ordered after.
    time.sleep(max(0.0, 1.05 - (time.time() % 1.0)))
    with Monitor(log_dir, enabled=True, purge_step=5) as mon:
        for step in range(5, 7):
            mon.scalar("train/loss", 100.0 + step, step)
    got = read_scalars(log_dir)["train/loss"]
    assert got == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0)]


def test_figure(tmp_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    plt.plot([0, 1], [1, 0])
    with Monitor(tmp_path / "tb", enabled=True) as mon:
        mon.figure("analysis/pca", fig, 0)
        mon.scalar("latent/probe_collapse_cos_step1", 0.5, 0)
    assert _event_files(tmp_path / "tb")
    tags = read_tags(tmp_path / "tb")
    assert tags["images"] == ["analysis/pca"]
    assert tags["scalars"] == ["latent/probe_collapse_cos_step1"]
    assert not plt.fignum_exists(fig.number), "Monitor.figure closes the figure"
    with pytest.raises(FileNotFoundError, match="nope"):
        read_tags(tmp_path / "nope")


def test_read_scalars_missing_dir(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        read_scalars(tmp_path / "nope")
