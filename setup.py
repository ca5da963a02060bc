"""Build script for ltscale.

All metadata (name, version, dependencies, console scripts, package discovery) lives in
pyproject.toml; this file exists only for the optional native extension ``ltscale._C``.

Extension policy, chosen by ``_extensions()``:

* no ``ltscale/ops/csrc/*.cpp`` sources, or ``LTSCALE_BUILD_EXT=0``  -> pure-Python package;
  ``ltscale.ops`` falls back to its torch reference implementations.
* ``LTSCALE_BUILD_EXT=cpu``                                           -> C++ (CPU) extension only.
* otherwise (default, ``auto``/``1``)                                -> ``CUDAExtension`` with
  ``csrc/*.cu`` when the installed torch is a CUDA build and a CUDA toolkit is found, else a
  ``CppExtension``.  A CPU torch always takes the C++ branch (torch then reports
  ``CUDA_HOME=None`` whatever the environment says).  A CUDA build on a machine without a GPU
  needs ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"9.0"``).

torch is imported lazily, inside ``_extensions()``, and only when there is something to build:
the project is installed with ``pip install --no-build-isolation`` against the venv's pinned
torch (pyproject.toml deliberately does not list torch as a build requirement, because an
isolated build env would resolve a multi-GB CUDA torch).  A pure-Python build needs no torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = Path("ltscale") / "ops" / "csrc"  # relative: setuptools wants relative source paths
EXT_NAME = "ltscale._C"


def _build_mode() -> str:
    """``LTSCALE_BUILD_EXT``: ``0`` (no extension), ``cpu`` (C++ only) or ``auto`` (default)."""
    mode = os.environ.get("LTSCALE_BUILD_EXT", "auto").strip().lower()
    aliases = {"": "auto", "1": "auto", "auto": "auto", "0": "0", "off": "0", "cpu": "cpu"}
    if mode not in aliases:
        raise SystemExit(f"setup.py: LTSCALE_BUILD_EXT={mode!r} is not one of 0, cpu, auto")
    return aliases[mode]


def _sources(pattern: str, root: Path = ROOT) -> list[str]:
    # Sorted so that the build (and its ninja cache keys) is deterministic.
    return sorted(str(p.relative_to(root)) for p in (root / CSRC).glob(pattern))


def _extensions(root: Path = ROOT) -> list:
    """The ext_modules list: ``[]`` when there is nothing (or nothing wanted) to build."""
    mode = _build_mode()
    cpp = _sources("*.cpp", root)
    if mode == "0" or not cpp:
        return []

    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - depends on how pip was invoked
        raise SystemExit(
            f"setup.py: building {EXT_NAME} from {CSRC}/*.cpp needs torch in the build environment. "
            "Install torch first and use `pip install --no-build-isolation -e .` (or `make install`), "
            "or set LTSCALE_BUILD_EXT=0 to skip the extension."
        ) from exc

    cxx_flags = ["-O3"]
    cuda = _sources("*.cu", root)
    cuda_ok = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "auto" and cuda and cuda_ok:
        return [
            cpp_extension.CUDAExtension(
                EXT_NAME,
                cpp + cuda,
                define_macros=[("WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            )
        ]
    return [cpp_extension.CppExtension(EXT_NAME, cpp, extra_compile_args=cxx_flags)]


def _cmdclass(ext_modules: list) -> dict:
    # torch's BuildExtension supplies the include paths, -std=c++17, ABI flags and ninja builds;
    # only needed (and only importable) when an extension is actually built.
    if not ext_modules:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


# Guarded so tests can import this file to inspect _extensions(); setuptools' PEP 517 backend
# executes setup.py with __name__ == "__main__", so pip builds still reach setup().
if __name__ == "__main__":
    ext_modules = _extensions()
    setup(ext_modules=ext_modules, cmdclass=_cmdclass(ext_modules))
