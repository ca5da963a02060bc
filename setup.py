"""Build script for ltscale.

All metadata (name, version, dependencies, console scripts, package discovery) lives in
pyproject.toml; this file exists only for the optional native extension ``ltscale._C``.

Extension policy, chosen by ``_extensions()``:

* no ``ltscale/ops/csrc/*.cpp`` sources, or ``LTSCALE_BUILD_EXT=0``  -> pure-Python package;
  ``ltscale.ops`` falls back to its torch reference implementations.
* ``LTSCALE_BUILD_EXT=cpu``                                           -> C++ (CPU) extension only.
* otherwise (default, ``auto``/``1``)                                -> ``CUDAExtension`` with
  ``csrc/*.cu`` when the installed torch is a CUDA build and ``$CUDA_HOME/bin/nvcc`` exists (no
  GPU needed), else a ``CppExtension``, with a printed reason.  A CPU torch always takes the C++
  branch (torch then reports ``CUDA_HOME=None`` whatever the environment says).
  ``TORCH_CUDA_ARCH_LIST`` defaults to ``"8.0;9.0+PTX"``: Ampere and Hopper machine code, plus
  Hopper PTX that the driver compiles for any newer GPU (without it, a GPU newer than the build
  has no kernel). The build records what it holds (``LTSCALE_CUDA_ARCHS``, ``arch_tag``) and
  ``ltscale.ops`` checks a device's compute capability against it before dispatch.
  ``FORCE_CUDA=1`` makes a missing CUDA torch or nvcc an error instead of a fallback (the CI
  compile proof uses it).  On machines whose ``nvcc`` on PATH is a wrapper, set ``CUDA_HOME`` to
  the real toolkit.

torch is imported lazily, inside ``_extensions()``, and only when there is something to build:
the project is installed with ``pip install --no-build-isolation`` against the venv's pinned
torch (pyproject.toml deliberately does not list torch as a build requirement, because an
isolated build env would resolve a multi-GB CUDA torch).  A pure-Python build needs no torch.
"""

from __future__ import annotations

import os
import sys
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


DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # Ampere (A100) and Hopper (H100/H200) cubins; Hopper PTX for newer GPUs


def arch_tag(archs: str) -> str:
    """What a ``TORCH_CUDA_ARCH_LIST`` builds, as one identifier: ``"8.0;9.0+PTX"`` ->
    ``"sm_80_sm_90_ptx_90"`` (a cubin per entry, PTX for ``+PTX`` entries). ``ltscale.ops`` reads it
    back (``fused_build_info``) to check a device's compute capability."""
    parts = []
    for entry in archs.replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        name = "".join(ch for ch in entry.split("+")[0].replace(".", "") if ch.isalnum())
        parts.append(f"sm_{name}")
        if entry.upper().endswith("+PTX"):
            parts.append(f"ptx_{name}")
    return "_".join(parts)


def _say(msg: str) -> None:
    # setuptools' own logging is swallowed by `pip install` unless -v; a plain print to stderr
    # shows up in pip's output when the build fails and in `pip install -v` otherwise.
    print(f"setup.py: {msg}", file=sys.stderr, flush=True)


def _cuda_plan(torch, cpp_extension, have_cu: bool, mode: str) -> tuple[bool, str]:
    """(build the CUDA kernel?, why). ``FORCE_CUDA=1`` turns every "no" into an error.

    A GPU is *not* required: a CUDA build of torch plus nvcc compiles the kernel for
    ``TORCH_CUDA_ARCH_LIST`` (default ``DEFAULT_CUDA_ARCHS``) on a GPU-less machine.
    """
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    if mode == "cpu":
        why = "LTSCALE_BUILD_EXT=cpu"
    elif not have_cu:
        why = f"no {CSRC}/*.cu sources"
    elif torch.version.cuda is None:
        why = f"torch {torch.__version__} is not a CUDA build"
    elif nvcc is None or not nvcc.exists():
        why = f"no nvcc under CUDA_HOME={cuda_home} (set CUDA_HOME to the toolkit)"
    else:
        return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc {nvcc}"
    if force:
        raise SystemExit(f"setup.py: FORCE_CUDA=1 but the CUDA kernel cannot be built: {why}")
    return False, why


def _extensions(root: Path = ROOT) -> list:
    """The ext_modules list: ``[]`` when there is nothing (or nothing wanted) to build."""
    mode = _build_mode()
    cpp = _sources("*.cpp", root)
    if mode == "0" or not cpp:
        if cpp:
            _say(f"LTSCALE_BUILD_EXT=0: not building {EXT_NAME}; ltscale.ops uses its torch implementations")
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
    use_cuda, why = _cuda_plan(torch, cpp_extension, bool(cuda), mode)
    if use_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCHS
        # torch reads the variable itself when it writes the nvcc command line; without it (and
        # without a GPU to ask) it fails with an IndexError.
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        tag = arch_tag(archs)
        _say(f"building {EXT_NAME}: C++ CPU kernel + CUDA kernel for TORCH_CUDA_ARCH_LIST={archs!r} ({why})")
        return [
            cpp_extension.CUDAExtension(
                EXT_NAME,
                cpp + cuda,
                define_macros=[("WITH_CUDA", None), ("LTSCALE_CUDA_ARCHS", tag)],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            )
        ]
    _say(f"building {EXT_NAME}: C++ CPU kernel only ({why})")
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
