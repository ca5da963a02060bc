"""``ltscale env``: the report has every section, and a missing or broken package never crashes it."""

from __future__ import annotations

import json
import sys

import pytest

from ltscale.cli import main
from ltscale.engine import envinfo


@pytest.fixture(scope="module")
def report() -> dict:
    return envinfo.collect()


def test_collect_has_the_keys(report):
    assert report.keys() >= {
        "ltscale",
        "python",
        "platform",
        "packages",
        "ltscale_ext",
        "mpirun",
        "nvcc",
        "env",
    }
    assert set(report["packages"]) == set(envinfo.PACKAGES)
    torch_info = report["packages"]["torch"]
    assert torch_info["installed"] and torch_info.keys() >= {
        "version",
        "cuda_build",
        "cuda_available",
        "devices",
    }
    ds = report["packages"]["deepspeed"]
    assert ds["installed"] and ds.keys() >= {"accelerator", "comm_backend"}
    assert isinstance(report["ltscale_ext"]["built"], bool)
    assert set(report["env"]) == set(envinfo.ENV_VARS)
    text = envinfo.format_report(report)
    for name in ("python", *envinfo.PACKAGES, "ltscale._C", "nvcc", "DS_ACCELERATOR", "SLURM_JOB_ID"):
        assert name in text
    json.dumps(report)  # --json must be able to print it


def test_missing_and_broken_packages_are_reported_not_raised(monkeypatch):
    real = envinfo.importlib.import_module

    def fake_import(name, *a, **kw):
        if name == "mpi4py":
            raise RuntimeError("libmpi.so.40: cannot open shared object file")
        return real(name, *a, **kw)

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import -> ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.setattr(envinfo.importlib, "import_module", fake_import)
    monkeypatch.setattr("ltscale.ops.fused_available", lambda: (_ for _ in ()).throw(OSError("bad .so")))
    d = envinfo.collect()
    pk = d["packages"]
    assert pk["sentencepiece"] == {"installed": False, "version": envinfo.NOT_INSTALLED}
    assert pk["deepspeed"] == {"installed": False, "version": envinfo.NOT_INSTALLED}
    assert not pk["mpi4py"]["installed"] and "libmpi.so.40" in pk["mpi4py"]["version"]
    assert d["ltscale_ext"]["built"] is False and "bad .so" in d["ltscale_ext"]["error"]
    text = envinfo.format_report(d)
    assert "not installed" in text and "accelerator" not in text


def test_env_json_parses(capsys, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert main(["env", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["env"]["DS_ACCELERATOR"] == "cpu" and d["env"]["SLURM_JOB_ID"] == "4242"
    assert d["packages"]["torch"]["installed"]
    assert main(["env"]) == 0
    assert "SLURM_JOB_ID" in capsys.readouterr().out


def test_extension_report_names_kernels_and_archs(monkeypatch):
    info = {"built": True, "cpu": True, "cuda": True, "cuda_archs": ["sm_80", "sm_90"]}
    monkeypatch.setattr("ltscale.ops.fused_available", lambda: True)
    monkeypatch.setattr("ltscale.ops.fused_build_info", lambda: dict(info))
    d = envinfo.collect()
    assert d["ltscale_ext"] == info
    line = next(ln for ln in envinfo.format_report(d).splitlines() if ln.startswith("ltscale._C"))
    assert "CPU + CUDA" in line and "sm_80, sm_90" in line
    monkeypatch.setattr("ltscale.ops.fused_available", lambda: False)
    d = envinfo.collect()
    assert d["ltscale_ext"] == {"built": False}
    assert "not built (torch path)" in envinfo.format_report(d)


def test_extension_report_matches_the_installed_build():
    from ltscale.ops import fused_available, fused_build_info

    ext = envinfo.collect()["ltscale_ext"]
    assert ext["built"] == fused_available()
    if ext["built"]:
        assert ext == fused_build_info() and ext["cpu"]
