"""Plain helpers shared by the test tiers (no pytest import, so rank scripts started as subprocesses
can import them too).

* ``make_tiny_llama`` / ``tiny_latent_lm``: the tiny random Llama every model test builds, in one
  place, so that a test differs from the others only in the arguments it passes.
* ``DIST_ENV`` / ``launch_env`` / ``free_port`` / ``popen_group`` / ``communicate_group``: how a
  test starts a multi-rank job: a clean environment (no leaked ``RANK``/``MASTER_*``), a fresh
  port, a process group of its own that is killed as a whole on a timeout or an interrupt.
* ``HostToDevice``: which of ltscale's calls copy host data to a device without ``to_device``.
* ``skip_or_fail``: the one way a test skips for something missing on this machine (``require_fused``,
  ``require_lm_eval`` build on it).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NoReturn

import torch
from torch.overrides import TorchFunctionMode

import ltscale

# Variables describing a distributed job; stripped from the environment of launched ranks so the
# launcher alone decides them.
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def make_tiny_llama(
    vocab_size: int = 64,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    tie: bool = False,
    attn: str = "sdpa",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    *,
    max_positions: int = 256,
    isolated_rng: bool = True,
    record_dtype: bool = True,
):
    """A tiny, randomly initialised ``LlamaForCausalLM`` (in training mode, as constructed).

    Same arguments -> bit-identical weights.  ``kv_heads=None`` means plain multi-head attention;
    pass fewer to exercise GQA.  Built in fp32 (torch's default dtype) and then cast to ``dtype``,
    so e.g. float64 and float32 models with the same seed hold the same values.

    ``isolated_rng`` (default): init runs under ``fork_rng``, leaving the caller's global RNG
    untouched.  ``False`` seeds the global RNG instead, for tests whose later random draws (an
    adapter's or projection's init) rely on the state the build leaves behind.
    ``record_dtype``: store ``dtype`` in the config (``config.dtype``); ``False`` leaves it unset,
    as a bare ``LlamaConfig`` has it.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads if kv_heads is not None else heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        attn_implementation=attn,
        dtype=dtype if record_dtype else None,
    )
    if isolated_rng:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(cfg)
    else:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def tiny_latent_lm(think_id: int, mode: str, vocab_size: int = 64):
    """The unit tests' tiny latent model: a GQA (4 heads, 2 kv) fp64 Llama, global seed 0, wrapped
    in ``LatentLM`` with ``<thinking>`` = ``think_id``."""
    from ltscale.model import LatentLM

    base = make_tiny_llama(vocab_size, kv_heads=2, max_positions=2048, isolated_rng=False, record_dtype=False)
    return LatentLM(base, think_id, mode=mode)


def skip_or_fail(reason: str, *, module_level: bool = False) -> NoReturn:
    """Skip for ``reason`` (something this machine lacks: built extension, data, a package); under
    ``CI=true``, where CI installs all of it, fail instead, so a missing piece can never pass as
    skipped tests."""
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a failure, not a skip)", pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


def require_fused(*, module_level: bool = False) -> None:
    """``ltscale._C`` is built (``make install`` builds it), else :func:`skip_or_fail`."""
    from ltscale.ops import fused_available

    if not fused_available():
        skip_or_fail("ltscale._C is not built (run `make install`)", module_level=module_level)


def require_lm_eval() -> None:
    """lm-evaluation-harness (the ``[eval]`` extra, which ``make install`` installs), else
    :func:`skip_or_fail`."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        skip_or_fail("lm-eval is not installed (pip install -e '.[eval]')")


_PACKAGE = Path(ltscale.__file__).resolve().parent


class HostToDevice(TorchFunctionMode):
    """Inside ``with HostToDevice() as moves:``, ``moves.found`` lists every call in ltscale's own
    code (``file:line function``) that puts data on a device other than through
    ``ltscale.model.device.to_device``: ``torch.tensor``/``as_tensor`` with a device, ``Tensor.to``
    or ``.cuda`` with one. The call is what counts, so a CPU run shows what a GPU run would copy;
    factories that only fill (``zeros``, ``full``, ``arange``) on a device are not copies."""

    _COPIES = ("tensor", "as_tensor", "asarray", "to", "cuda")

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self._COPIES and (
            kwargs.get("device") is not None
            or func.__name__ == "cuda"
            or any(isinstance(a, (torch.device, str)) for a in args[1:])
        ):
            frame = sys._getframe(1)
            while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
                frame = frame.f_back
            where = Path(frame.f_code.co_filename if frame is not None else "?").resolve()
            if where.is_relative_to(_PACKAGE) and where != _PACKAGE / "model" / "device.py":
                self.found.append(f"{where.relative_to(_PACKAGE)}:{frame.f_lineno} {frame.f_code.co_name}")
        return func(*args, **kwargs)


def zero3_latent_step(lm, batch: dict, world_size: int):
    """One ZeRO-3 (every tensor sharded) forward + backward of ``lm`` on this rank's ``batch``, at the
    ranks' common pass count. Returns ``(engine, output, full gradients by name, local passes, passes)``."""
    from ltscale.engine import all_reduce_max, build_engine, full_grad, render_ds_config

    names = [n for n, _ in lm.named_parameters()]
    ds = render_ds_config("zero3", micro_batch=2, grad_accum=1, world_size=world_size, grad_clip=0.0,
                          precision="fp32", overrides={"zero_optimization.stage3_param_persistence_threshold": 0})
    engine = build_engine(lm, ds_config=ds, lr=0.0, weight_decay=0.0,
                          external_parameters=lm.zero3_external_parameters())
    local = lm.count_passes(batch["input_ids"], batch["attention_mask"])
    passes = all_reduce_max(local)
    out = engine(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 min_passes=passes, return_logits=False)
    engine.backward(out.loss)
    grads = {n: full_grad(prm) for n, prm in zip(names, lm.parameters())}
    return engine, out, grads, local, passes


def max_rel_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Worst per-tensor ``max |got - want| / max |want|`` over ``want``'s names."""
    return max(((got[n] - want[n]).abs().max() / (want[n].abs().max() + 1e-30)).item() for n in want)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1, below the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` is an ephemeral one: between this check and the
    rendezvous binding it, any outgoing connection (mpirun's daemons, another test's gloo ranks) may
    be given the same port, and the store then fails with EADDRINUSE (seen once in CI). Ports
    below the ephemeral range are never handed out implicitly, so only an explicit bind can race.
    """
    low = 20000
    with contextlib.suppress(OSError, ValueError):
        low = min(low, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) - 2000)
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(low - 8000, 1024), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("free_port: no bindable port found below the ephemeral range")


def pythonpath(repo_root: str | os.PathLike) -> str:
    """``PYTHONPATH`` with the repo root in front, so ranks import this checkout's ``ltscale``."""
    return os.pathsep.join(p for p in (str(repo_root), os.environ.get("PYTHONPATH")) if p)


def launch_env(
    repo_root: str | os.PathLike | None = None, *, drop: Iterable[str] = DIST_ENV, **extra: str
) -> dict[str, str]:
    """The test process's environment for a launched job: without the ``drop`` variables (left by
    another test, they would make every subprocess believe it is part of a job), on CPU with one
    thread per rank and FutureWarnings off, the repo root on ``PYTHONPATH`` when ``repo_root`` is
    given; ``extra`` entries last."""
    drop = frozenset(drop)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning")
    if repo_root is not None:
        env["PYTHONPATH"] = pythonpath(repo_root)
    env.update(extra)
    return env


def torchrun_cmd(script: str | os.PathLike, nproc: int, port: int, args: Sequence[str] = ()) -> list[str]:
    """``python -m torch.distributed.run`` (= ``torchrun``) of the running interpreter, one node,
    rendezvous on 127.0.0.1:``port``: the ranks use the test's venv."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        str(script), *map(str, args),
    ]  # fmt: skip


def deepspeed_cmd(script: str | os.PathLike, nproc: int, port: int, args: Sequence[str] = ()) -> list[str]:
    """The product's own launch line (``deepspeed --num_gpus N ltscale/train.py ...``), with the
    ``deepspeed`` launcher of the running interpreter's venv."""
    return [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc),
        "--master_port", str(port), str(script), *map(str, args),
    ]  # fmt: skip


def popen_group(
    cmd: Sequence[str], *, env: dict[str, str], cwd: str | os.PathLike, merge_stderr: bool = False
) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own (text pipes), so ``kill_group`` reaches the ranks a
    launcher forks, not only the launcher."""
    return subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen, *, sigterm_first: bool = True) -> None:
    """Take down ``proc``'s whole process group.  ``sigterm_first``: SIGTERM, 10 s to let torchrun
    tear down its workers, then SIGKILL whatever is left (5 s); otherwise SIGKILL at once."""
    steps = ((signal.SIGTERM, 10), (signal.SIGKILL, 5)) if sigterm_first else ((signal.SIGKILL, None),)
    for sig, grace in steps:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def communicate_group(
    proc: subprocess.Popen, timeout: float, *, sigterm_first: bool = True
) -> tuple[str | None, str | None, bool]:
    """``(stdout, stderr, timed_out)`` of a ``popen_group`` process.  On a timeout the group is
    killed and what it wrote so far returned; an interrupt (pytest-timeout, Ctrl-C) also kills the
    group before it propagates, so no rank outlives the test.  ``sigterm_first=False``: SIGKILL at
    once."""
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        kill_group(proc, sigterm_first=sigterm_first)
        out, err = proc.communicate()
        timed_out = True
    finally:
        if proc.poll() is None:
            kill_group(proc, sigterm_first=sigterm_first)
    return out, err, timed_out


def tail(text: str | None, limit: int = 12_000) -> str:
    """The last ``limit`` characters of a launch's output, marked where it was cut."""
    text = text or ""
    return text if len(text) <= limit else f"... [{len(text) - limit} chars cut] ...\n{text[-limit:]}"
