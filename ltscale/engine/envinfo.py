"""``ltscale env``: what this machine offers ltscale, in the spirit of DeepSpeed's ``ds_report``.

Why it exists: most "it hangs / it is slow / it picked the wrong backend" reports come down to the
environment (a CPU torch on a GPU node, a missing ``DS_ACCELERATOR``, no ``mpirun``, the fused
extension not built, a stray ``MASTER_PORT``). One command a user can paste into an issue answers
all of it. Every probe is defensive: a package that is missing *or broken* (an import that raises
anything, a CUDA query that fails) is reported as such, never crashes the report.

This is the one place outside ``ltscale/engine`` that imports ``deepspeed``: only to print its
version and accelerator, never to use it.
"""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

__all__ = ["ENV_VARS", "PACKAGES", "collect", "format_report"]

NOT_INSTALLED = "not installed"
# Optional packages whose version matters for a run (import name -> shown name).
PACKAGES = (
    "torch",
    "deepspeed",
    "transformers",
    "datasets",
    "sentencepiece",
    "tensorboard",
    "mpi4py",
    "safetensors",
    "tokenizers",
)
ENV_VARS = (
    "DS_ACCELERATOR",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_JOB_ID",
    "TORCH_EXTENSIONS_DIR",
    "LTSCALE_DATA_DIR",
)


def _error(e: BaseException) -> str:
    return f"error: {type(e).__name__}: {e}".strip()


def _import(name: str) -> tuple[Any, str | None]:
    """(module, None) or (None, why not): ImportError means not installed, anything else is broken."""
    try:
        return importlib.import_module(name), None
    except ImportError:
        return None, NOT_INSTALLED
    except Exception as e:  # a package whose import crashes is worth reporting, not dying on
        return None, _error(e)


def _version(mod: Any, dist_name: str) -> str:
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(dist_name)
        except Exception:
            version = "unknown"
    return str(version)


def _package(name: str) -> dict[str, Any]:
    mod, why = _import(name)
    if mod is None:
        return {"installed": False, "version": why}
    return {"installed": True, "version": _version(mod, name)}


def _torch_info(info: dict[str, Any]) -> None:
    mod, _ = _import("torch")
    if mod is None or not info["installed"]:
        return
    try:
        available = bool(mod.cuda.is_available())
        info.update(
            cuda_build=mod.version.cuda,
            hip_build=getattr(mod.version, "hip", None),
            cuda_available=available,
            device_count=mod.cuda.device_count() if available else 0,
            devices=[mod.cuda.get_device_name(i) for i in range(mod.cuda.device_count())]
            if available
            else [],
            num_threads=mod.get_num_threads(),
        )
    except Exception as e:
        info["cuda_error"] = _error(e)


def _deepspeed_info(info: dict[str, Any]) -> None:
    mod, _ = _import("deepspeed")
    if mod is None or not info["installed"]:
        return
    try:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        info.update(accelerator=acc.device_name(), comm_backend=acc.communication_backend_name())
    except Exception as e:
        info["accelerator_error"] = _error(e)
    try:
        from deepspeed.git_version_info import installed_ops

        info["prebuilt_ops"] = sorted(k for k, v in installed_ops.items() if v)
    except Exception:
        info["prebuilt_ops"] = None


def _nvcc() -> dict[str, Any]:
    path = shutil.which("nvcc")
    out: dict[str, Any] = {"path": path, "version": None}
    if path:
        try:
            text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
            release = [ln for ln in text.splitlines() if "release" in ln]
            out["version"] = release[-1].strip() if release else text.strip().splitlines()[-1:]
        except Exception as e:
            out["version"] = _error(e)
    return out


def _extension() -> dict[str, Any]:
    """What ``ltscale._C`` (the fused fusion op) holds: ``built``, ``cpu`` / ``cuda`` kernels,
    ``cuda_archs`` (from the build); not built means the torch path runs."""
    try:
        from ltscale.ops import fused_available

        if not fused_available():
            return {"built": False}
        from ltscale.ops import fused_build_info

        return dict(fused_build_info())
    except Exception as e:
        return {"built": False, "error": _error(e)}


def collect() -> dict[str, Any]:
    """The report as a JSON-able dict: ``python``, ``platform``, ``packages``, ``ltscale_ext``,
    ``mpirun``, ``nvcc``, ``env``. Never raises for a missing or broken package."""
    packages = {name: _package(name) for name in PACKAGES}
    _torch_info(packages["torch"])
    _deepspeed_info(packages["deepspeed"])
    return {
        "ltscale": _version(sys.modules["ltscale"], "ltscale"),
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": packages,
        "ltscale_ext": _extension(),
        "mpirun": shutil.which("mpirun"),
        "nvcc": _nvcc(),
        "env": {k: os.environ.get(k) for k in ENV_VARS},
    }


def _yes(flag: Any) -> str:
    return "yes" if flag else "no"


def format_report(d: dict[str, Any]) -> str:
    """Human-readable two-column report of :func:`collect`'s dict."""
    rows: list[tuple[str, str]] = [
        ("ltscale", d.get("ltscale", "?")),
        ("python", f"{d['python']['version']} ({d['python']['executable']})"),
        ("platform", f"{d.get('platform')}, {d.get('cpu_count')} CPUs"),
    ]
    pk = d["packages"]
    for name in PACKAGES:
        info = pk.get(name, {"version": NOT_INSTALLED})
        rows.append((name, str(info.get("version"))))
        if name == "torch" and info.get("installed"):
            if "cuda_error" in info:
                rows.append(("  cuda", info["cuda_error"]))
            else:
                devs = ", ".join(info.get("devices") or []) or "none"
                rows.append(
                    (
                        "  cuda build",
                        str(info.get("cuda_build") or info.get("hip_build") or "none (CPU build)"),
                    )
                )
                rows.append(("  cuda available", f"{_yes(info.get('cuda_available'))} (devices: {devs})"))
        if name == "deepspeed" and info.get("installed"):
            if "accelerator_error" in info:
                rows.append(("  accelerator", info["accelerator_error"]))
            else:
                rows.append(
                    ("  accelerator", f"{info.get('accelerator')} (comm backend {info.get('comm_backend')})")
                )
            ops = info.get("prebuilt_ops")
            rows.append(("  prebuilt ops", ", ".join(ops) if ops else "none (JIT on first use)"))
        if name == "mpi4py":
            rows.append(("  mpirun on PATH", d.get("mpirun") or "no"))
    ext = d["ltscale_ext"]
    if ext.get("built"):
        kernels = [k for k in ("cpu", "cuda") if ext.get(k)]
        archs = ", ".join(ext.get("cuda_archs") or [])
        ext_text = "built (fused path): kernels " + (" + ".join(k.upper() for k in kernels) or "none")
        ext_text += f"; CUDA archs {archs}" if archs else "; no CUDA kernel"
    else:
        ext_text = "not built (torch path)" + (f"; {ext['error']}" if ext.get("error") else "")
    rows.append(("ltscale._C", ext_text))
    nvcc = d["nvcc"]
    rows.append(("nvcc", f"{nvcc['path']} ({nvcc['version']})" if nvcc.get("path") else "not on PATH"))
    for k, v in d["env"].items():
        rows.append((k, "unset" if v is None else v))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
