"""LTSCALE_FAULT parsing and hit counting (the harness's own correctness)."""

from __future__ import annotations

import math

import pytest

from ltscale import faults


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.reset()
    yield
    faults.reset()


def test_unset_is_a_no_op():
    assert all(faults.check("step", stage=1) is None for _ in range(5))


def test_hits_ranges_stages_and_ranks(monkeypatch):
    monkeypatch.setenv(faults.ENV, "nan:loss.s2:2-3,inf:grad:2-@1")
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(k, v)
    got = [faults.check("loss", stage=s) for s in (1, 2, 2, 2, 2)]
    assert [g is not None and math.isnan(g) for g in got] == [False, False, True, True, False]
    assert [faults.check("grad") for _ in range(3)] == [None, None, None]  # rank 0: not for me
    faults.reset()
    monkeypatch.setenv("RANK", "1")
    assert [faults.check("grad") for _ in range(3)] == [None, math.inf, math.inf]


@pytest.mark.parametrize("bad", ["kill:step", "explode:step:1", "kill::1", "kill:step:0", "kill:step:3-2",
                                 "kill:step:x", "kill:step:1@one"])  # fmt: skip
def test_malformed_entries_are_errors(monkeypatch, bad):
    monkeypatch.setenv(faults.ENV, bad)
    with pytest.raises(ValueError, match=faults.ENV):
        faults.check("step")


def test_poison_grad_keeps_the_loss_and_poisons_its_gradient(monkeypatch):
    import torch

    monkeypatch.setenv(faults.ENV, "nan:grad:1")
    w = torch.ones(3, requires_grad=True)
    loss = faults.poison_loss((w * 2).sum())
    assert loss.item() == 6.0
    loss.backward()
    assert torch.isnan(w.grad).all()
