"""The training precision end to end, and where batches go (tests/e2e/precision_worker.py runs a
shrunk fp32 and a bf16 3-stage curriculum through the real Trainer, ZeRO-3 on one CPU rank).

What this proves on CPU:
* ``engine.precision=bf16`` builds, trains, exports and evaluates in bf16: every stage's
  safetensors hold bf16 tensors and ``config.json`` says bfloat16, the evaluation after each stage
  ran, and loading an export for ``ltscale eval`` gives a bf16 model; the logged losses stay within
  1% (relative) of the same fp32 run at every step (measured: <= 0.05%).
* the training step hands the engine the host batch itself (every tensor is one ``collate`` made,
  on CPU, not moved), and what the model reads on its device came out of ``to_device(..., model
  device)``: every tensor of each forward's rollout plan, the ids the embedding reads and the
  positions the decoder reads are views of the plan's one shipped copy; no other call in ltscale
  puts data on a device during a training forward; every tensor the confidence-scoring forward
  hands to the base model came out of ``to_device(batch, engine.device)``. Engine and model claim
  another device than the batches' (``meta``).
What it cannot prove without a GPU: that the copy to a real CUDA device is pinned and
asynchronous (``tests/unit/test_device.py`` checks the call on a pinned-capable path, the GPU
script runs it for real), that DeepSpeed's engine passes CPU inputs through untouched on CUDA as it
does here, nor bf16 kernels' numerics on a GPU. That the forward from host ids reads nothing back
from the device is tests/unit/test_host_batch.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOLERANCE = 0.01  # relative, per logged step


@pytest.fixture(scope="module")
def result(tmp_path_factory, repo_root, run_ranks):
    work = tmp_path_factory.mktemp("precision")
    out = work / "result.json"
    run_ranks(repo_root / "tests" / "e2e" / "precision_worker.py", nproc=1,
              args=["--out", str(out), "--workdir", str(work)], timeout=600)  # fmt: skip
    return json.loads(out.read_text())


def test_training_forward_gets_host_batches_and_the_model_reads_them_through_to_device(result):
    r = result["fp32"]
    assert r["devices"] == [r["engine_device"]], "to_device was called with another device than the model's"
    steps = 3 * 4  # 3 stages of 32 examples in micro-batches of 8
    assert len(r["engine"]) == 3 * steps and all(r["engine"]), (
        "the engine got tensors other than the host batch collate made"
    )
    assert len(r["plans"]) == steps and all(r["plans"]), (
        "a rollout plan holds tensors that to_device did not ship"
    )
    assert len(r["embedded"]) == steps and all(r["embedded"]), (
        "the embedding read ids that to_device did not ship"
    )
    assert len(r["positions"]) >= steps and all(r["positions"]), (
        "the decoder read positions that to_device did not ship"
    )
    assert r["host_to_device"] == [], f"ltscale put data on a device without to_device: {r['host_to_device']}"


def test_scoring_batches_reach_the_engine_device_through_to_device(result):
    assert result["fp32"]["score"] and all(result["fp32"]["score"]), (
        "the confidence-scoring forward got tensors that to_device did not move"
    )


def test_bf16_curriculum_exports_and_evaluates_in_bf16_within_tolerance_of_fp32(result):
    from safetensors import safe_open

    from ltscale.model.io import load_latent_model

    run_dir = Path(result["bf16"]["run_dir"])
    for k in (1, 2, 3):
        hf = run_dir / f"stage{k}" / "hf"
        with safe_open(str(hf / "model.safetensors"), "pt") as f:
            dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 - not a dict
        assert dtypes == {"BF16"}, f"stage {k} export holds {dtypes}"
        assert json.loads((hf / "config.json").read_text())["dtype"] == "bfloat16"
        assert json.loads((run_dir / f"stage{k}" / "eval.json").read_text())["n"] == 4
    lm, _ = load_latent_model(run_dir / "stage3" / "hf")  # what `ltscale eval` loads
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}
    fp32, bf16 = result["fp32"]["losses"], result["bf16"]["losses"]
    assert len(fp32) == len(bf16) == 12, (fp32, bf16)
    worst = max(abs(a - b) / abs(a) for a, b in zip(fp32, bf16))
    assert worst <= TOLERANCE, f"bf16 loss {worst:.2%} off fp32 (tolerance {TOLERANCE:.0%}): {fp32} vs {bf16}"
