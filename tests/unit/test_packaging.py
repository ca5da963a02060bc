"""Packaging and install invariants: what `make install` promises, checked from the installed venv."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

PINNED_TORCH = "2.13.0"


def _py(code: str, repo_root: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a clean ``sys.modules``), outside the repo dir so the
    *installed* package is what gets imported."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo_root.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_import_ltscale(repo_root):
    proc = _py("import ltscale, pathlib; print(pathlib.Path(ltscale.__file__).resolve())", repo_root)
    assert proc.returncode == 0, proc.stderr
    # Editable install: the import resolves to this checkout, not to some stale copy.
    assert Path(proc.stdout.strip()) == repo_root / "ltscale" / "__init__.py"


def test_model_package_does_not_import_deepspeed(repo_root):
    # Design rule: only ltscale/engine may import deepspeed; ltscale.model must stay importable
    # (and usable for export/generation) without it.  Import the package and every submodule.
    code = (
        "import importlib, pkgutil, sys\n"
        "import ltscale.model as m\n"
        "for info in pkgutil.walk_packages(m.__path__, m.__name__ + '.'):\n"
        "    importlib.import_module(info.name)\n"
        "bad = sorted(k for k in sys.modules if k == 'deepspeed' or k.startswith('deepspeed.'))\n"
        "assert not bad, f'ltscale.model imported deepspeed: {bad[:5]}'\n"
    )
    proc = _py(code, repo_root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_console_script_installed():
    scripts = sysconfig.get_path("scripts")  # the venv's bin/ for the running interpreter
    exe = shutil.which("ltscale", path=scripts)
    assert exe, f"`ltscale` console script not found in {scripts}; run `make install`"
    # The entry point must also resolve (ltscale.cli:main exists and parses --help).
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_constraints_pin_torch(repo_root):
    lines = [ln.split("#", 1)[0].strip() for ln in (repo_root / "constraints.txt").read_text().splitlines()]
    torch_lines = [ln for ln in lines if re.match(r"torch\s*[=<>!~]", ln)]
    assert torch_lines == [f"torch=={PINNED_TORCH}"], torch_lines


def test_installed_torch_matches_pin():
    import torch

    # The local label (+cpu) is fine; a different release means something bypassed constraints.txt.
    assert torch.__version__.split("+")[0] == PINNED_TORCH, torch.__version__


def test_makefile_dev_tools_match_pyproject(repo_root):
    # The Makefile installs the dev tools itself (the project goes in with --no-deps); keep the
    # two lists from drifting apart.
    tomllib = pytest.importorskip("tomllib")  # stdlib from 3.11 (the project's Python)
    dev = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    m = re.search(r"^DEV_TOOLS\s*:?=\s*(.+)$", (repo_root / "Makefile").read_text(), re.M)
    assert m, "DEV_TOOLS not found in Makefile"
    assert sorted(m.group(1).split()) == sorted(dev)


def _load_setup_py(repo_root: Path):
    spec = importlib.util.spec_from_file_location("_ltscale_setup", repo_root / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # guarded by __name__ == "__main__": setup() does not run
    return mod


def test_setup_py_without_sources_builds_no_extension(repo_root, tmp_path, monkeypatch):
    setup_py = _load_setup_py(repo_root)
    monkeypatch.delenv("LTSCALE_BUILD_EXT", raising=False)
    assert setup_py._extensions(root=tmp_path) == []  # no ltscale/ops/csrc here at all
    (tmp_path / setup_py.CSRC).mkdir(parents=True)
    assert setup_py._extensions(root=tmp_path) == []  # empty csrc/
    assert setup_py._cmdclass([]) == {}


def test_setup_py_opt_out_and_cpu_branch(repo_root, tmp_path, monkeypatch):
    setup_py = _load_setup_py(repo_root)
    csrc = tmp_path / setup_py.CSRC
    csrc.mkdir(parents=True)
    (csrc / "ops.cpp").write_text("// stub\n")
    (csrc / "ops.cu").write_text("// stub\n")

    monkeypatch.setenv("LTSCALE_BUILD_EXT", "0")
    assert setup_py._extensions(root=tmp_path) == []

    monkeypatch.setenv("LTSCALE_BUILD_EXT", "cpu")
    (ext,) = setup_py._extensions(root=tmp_path)
    assert ext.name == "ltscale._C"
    assert ext.sources == [str(setup_py.CSRC / "ops.cpp")]  # .cu left out of the C++ build

    monkeypatch.setenv("LTSCALE_BUILD_EXT", "bogus")
    with pytest.raises(SystemExit, match="LTSCALE_BUILD_EXT"):
        setup_py._extensions(root=tmp_path)
