"""tests/gpu/run_on_device.sh in its dry mode (``LTSCALE_GPU_DRYRUN=1``: CPU, small sizes): the
script that runs first on a lent GPU runs here on every CI run, so it cannot rot between loans.

What this proves: the steps run in order with the repo's code (version and API checks, op tests,
kernel bench, the bf16 tiny curriculum with exports and evaluations, a SmolLM2-shaped fusion stage)
and write what they measure to $OUT. What it cannot: anything CUDA (the extension build, the
kernel's GB/s, device memory), the offline install of the carried packages, and timings.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import launch_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_gpu_script_dry_run_writes_its_measurements(tmp_path, repo_root):
    out = tmp_path / "out"
    env = launch_env(repo_root, LTSCALE_GPU_DRYRUN="1", OUT=str(out), TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", "tests/gpu/run_on_device.sh"], cwd=repo_root, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert {
        "env.json",
        "gpu_tests.txt",
        "kernel.md",
        "tiny.json",
        "smollm2.json",
        "summary.md",
        "run.log",
    } <= files
    assert len(files) <= 8, "more files than one device call brings back"
    env_info = json.loads((out / "env.json").read_text())
    assert env_info["problems"] == [] and env_info["transformers"].startswith("5.24.")
    assert "| float32 | 32000 | 576 | 8 |" in (out / "kernel.md").read_text()
    tiny = json.loads((out / "tiny.json").read_text())
    assert [s["mode"] for s in tiny["stages"]] == ["cot", "hidden", "fusion"] and tiny["error"] is None
    for s in tiny["stages"]:
        assert s["complete"] and s["export_dtypes"] == ["BF16"] and s["eval"]["n"] == 2, s
        assert s["tokens_per_s"] > 0 and s["loss_last"] is not None
    smol = json.loads((out / "smollm2.json").read_text())
    assert [(s["mode"], s["complete"], s["export_dtypes"]) for s in smol["stages"]] == [
        ("fusion", True, ["BF16"])
    ]
    assert smol["stages"][0]["latent_per_sample"] > 0, "the fusion stage inserted no latents"
    assert "host_peak_rss_gib" in tiny and (out / "summary.md").read_text().count("| BF16 |") == 4
