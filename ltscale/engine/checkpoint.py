"""Atomic, exactly-resumable checkpoints around DeepSpeed's engine checkpoints.

One checkpoint ``root/<tag>/`` holds (``checkpoint_dir.py`` owns ``root``: tags, ``latest``,
discovery and rotation)::

    zero_pp_rank_*_model_states.pt, *_optim_states.pt   DeepSpeed (per rank)
    rng_rank{r}.safetensors  python/numpy/torch(/cuda) RNG of rank r (``rng_state.py``)
    train_state.json     the trainer's state (step, consumed samples, stage, ...)
    ltscale_meta.json    world size, zero stage, versions, save time, and the size + sha256 of
                         every other file (the completion marker: written after all of them)

Why the dance: a crash (preemption, OOM, node loss) in the middle of ``engine.save_checkpoint``
leaves a half-written directory, and DeepSpeed's own ``latest`` would already name it only
if written early. Here every rank writes into ``.tmp-<tag>``; after a barrier rank 0 renames it
to ``<tag>`` (atomic on POSIX) and only then replaces ``latest``. So ``latest`` always names a
complete directory, and a directory without the ``.tmp-`` prefix is complete by construction.

DeepSpeed facts relied on (deepspeed 0.19.8, verified by tests/dist/test_engine_dist.py):
the tag is only a directory name - nothing inside the files refers to it, so a renamed directory
loads with ``load_checkpoint(root, tag=<new name>)``; ``load_checkpoint`` with a missing
``latest`` silently returns ``(None, None)``, so we check ourselves; optimizer state cannot be
loaded at another data-parallel world size (see ``_check_world_size`` for what can); a ZeRO-3
weights-only load ignores the tag and reads ``latest`` (worked around in ``load_checkpoint``).
Under ZeRO-3 an engine must not ``load_checkpoint`` right after its own ``save_checkpoint``
(DeepSpeed docstring): load into a freshly built engine.

Integrity (``integrity.py``): every file's size and sha256 go into the meta file, and
:func:`load_checkpoint` verifies them before DeepSpeed reads anything, naming a damaged file;
with ``fallback=True`` it resumes from the newest older checkpoint that verifies.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ltscale import faults
from ltscale.fsutil import atomic_write_text, chmod_to_umask, fsync_dir

from .checkpoint_dir import (
    LATEST,
    TMP_PREFIX,
    TRASH_PREFIX,
    clean_stale,
    latest_tag,
    list_checkpoints,
    read_latest,
    remove_tree,
    rotate,
    validate_tag,
)
from .dist import all_gather_object, dist_info
from .integrity import META_FILE, CheckpointCorruptError, hash_share, read_meta, verify_checkpoint
from .io_wait import wait_for_io
from .rng_state import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointCorruptError",
    "verify_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "write_json_atomic",
    "TRAIN_STATE_FILE",
]

TRAIN_STATE_FILE = "train_state.json"
RNG_FILE = "rng_rank{rank}.safetensors"
FORMAT_VERSION = 2  # 2: meta carries "files" (size + sha256 of every file)


# --------------------------------------------------------------------------- small helpers


def _check_json(obj: Any, where: str = "") -> None:
    """Raise TypeError naming the first key path that JSON cannot represent."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return
    if isinstance(obj, float):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"train_state key {where}{k!r} must be a str for JSON, got {type(k).__name__}"
                )
            _check_json(v, f"{where}{k}.")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_json(v, f"{where}[{i}].")
        return
    raise TypeError(
        f"value at {where.rstrip('.') or '<root>'!r} is a {type(obj).__name__}, which JSON cannot store; "
        "convert it (e.g. tensor.item(), str(path)) before checkpointing"
    )


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON so readers see the old file or the new one, never a torn one."""
    _check_json(obj)
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# --------------------------------------------------------------------------- integrity


def _verify_collective(path: Path, io_timeout_s: float | None = None) -> list[str]:
    """Every rank checks its share; every rank gets all problems (so all decide alike).

    Reading and hashing is I/O: the ranks meet in an I/O wait (``io_wait.py``) before the timed
    all-gather of the results.
    """
    info = dist_info()
    mine = verify_checkpoint(path, rank=info.rank, world_size=info.world_size)
    wait_for_io(f"verifying checkpoint {path}", io_timeout_s, slow_rank="the slowest rank")
    return [p for share in all_gather_object(mine) for p in share]


# --------------------------------------------------------------------------- commit


def _write_latest(root: Path, tag: str) -> None:
    atomic_write_text(root / LATEST, tag)


def _commit(root: Path, tmp: Path, final: Path) -> None:
    """Make ``tmp`` the checkpoint ``final`` and point ``latest`` at it (rank 0 only).

    Separate function so tests can simulate a crash right before the commit. The files in ``tmp``
    are already on disk: every rank fsynced its share while hashing it (``save_checkpoint``).
    """
    trash = None
    if final.is_symlink():
        raise FileExistsError(f"{final} is a symlink; refusing to replace it with a checkpoint")
    if final.exists():  # re-saving the same tag (e.g. after a resume): swap, then delete the old one
        trash = root / f"{TRASH_PREFIX}{final.name}"
        remove_tree(trash)
        os.rename(final, trash)
    os.rename(tmp, final)
    fsync_dir(root)
    faults.check("ckpt_before_latest")
    _write_latest(root, final.name)
    if trash is not None:
        remove_tree(trash)


# --------------------------------------------------------------------------- save / load


def save_checkpoint(
    engine: Any,
    root: str | Path,
    tag: str,
    train_state: dict[str, Any],
    *,
    rng: bool = True,
    keep_last_n: int | None = None,
    io_timeout_s: float | None = None,
) -> Path:
    """Save a complete, atomic checkpoint ``root/tag``. Collective: every rank must call it.

    ``train_state`` must be JSON-serialisable (checked on every rank before any I/O, so all
    ranks fail alike instead of leaving the others waiting in a barrier).
    The ranks wait for each other's file-system work (writing, hashing and fsyncing shares, rank
    0's commit and rotation) in I/O waits bounded by ``io_timeout_s`` (``io_wait.py``), not in
    barriers under the collective timeout. Returns the final checkpoint directory.
    """
    validate_tag(tag)
    _check_json(train_state)
    if keep_last_n is not None and keep_last_n < 1:
        raise ValueError(f"keep_last_n must be >= 1 or None, got {keep_last_n}")
    info = dist_info()
    root = Path(root)
    tmp = root / f"{TMP_PREFIX}{tag}"
    final = root / tag
    t0 = time.perf_counter()

    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        clean_stale(root)
    wait_for_io(f"checkpoint {final}: removing leftovers of interrupted saves", io_timeout_s)

    client_state = {"ltscale": {"tag": tag, "world_size": info.world_size}}
    ok = engine.save_checkpoint(str(root), tag=tmp.name, client_state=client_state, save_latest=False)
    if ok is False:
        raise RuntimeError(f"rank {info.rank}: DeepSpeed save_checkpoint into {tmp} reported failure")
    if rng:
        rng_file = tmp / RNG_FILE.format(rank=info.rank)
        save_file(capture_rng_state(), str(rng_file))
        chmod_to_umask(rng_file)  # safetensors writes 0600 whatever the umask
    if info.is_main:
        write_json_atomic(tmp / TRAIN_STATE_FILE, train_state)
    wait_for_io(f"checkpoint {final}: writing shards", io_timeout_s, slow_rank="the slowest rank")
    faults.check("ckpt_written")
    mine = hash_share(tmp, info.rank, info.world_size, fsync=True)
    wait_for_io(f"checkpoint {final}: hashing shards", io_timeout_s, slow_rank="the slowest rank")
    files: dict[str, Any] = {}
    for share in all_gather_object(mine):
        files.update(share)
    if info.is_main:
        meta = {
            "format": FORMAT_VERSION,
            "tag": tag,
            "world_size": info.world_size,
            "zero_stage": _zero_stage(engine),
            "global_steps": int(getattr(engine, "global_steps", 0)),
            "rng": bool(rng),
            "saved_at_ns": time.time_ns(),
            "torch_version": torch.__version__,
            "deepspeed_version": _ds_version(),
            "files": files,
        }
        write_json_atomic(tmp / META_FILE, meta)  # the completion marker, written last
        faults.check("ckpt_before_commit")
        _commit(root, tmp, final)
        if keep_last_n is not None:
            rotate(root, keep_last_n, protect={tag})
    # nobody proceeds (or loads) before `latest` is in place
    wait_for_io(f"checkpoint {final}: commit and rotation", io_timeout_s)
    log.info("saved checkpoint %s in %.2fs", final, time.perf_counter() - t0)
    return final


def _zero_stage(engine: Any) -> int:
    fn = getattr(engine, "zero_optimization_stage", None)
    return int(fn()) if callable(fn) else 0


def _ds_version() -> str | None:
    try:
        import deepspeed

        return str(deepspeed.__version__)
    except ImportError:  # pragma: no cover
        return None


def _checkpoint_world_size(path: Path, meta: dict[str, Any] | None) -> int | None:
    """World size a checkpoint was written with: our meta, else count DeepSpeed's per-rank files."""
    if meta is not None and "world_size" in meta:
        return int(meta["world_size"])
    n = len(list(path.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))
    return n or None


def _check_world_size(
    path: Path, meta: dict[str, Any] | None, world: int, stage: int, load_optimizer: bool
) -> None:
    """Refuse loads DeepSpeed cannot do at a new world size, with the way out in the message.

    DeepSpeed 0.19 (verified): optimizer state never reshards (ZeRORuntimeException deep inside);
    weights-only loads work when shrinking (ZeRO-3 rebuilds the fp32 weights from all shards
    on every rank; stages 0-2 keep whole weights in one file) but a ZeRO-3 weights-only load on
    *more* ranks fails with a bare AssertionError on the ranks that find no shard file.
    """
    saved = _checkpoint_world_size(path, meta)
    if saved is None or saved == world:
        return
    root, tag = path.parent, path.name
    if not load_optimizer and (stage < 3 or world < saved):
        log.warning(
            "checkpoint %s: world size %d -> %d, loading weights only (DeepSpeed reshards them; "
            "ZeRO-3 consolidates the full fp32 weights in every rank's host memory)",
            path,
            saved,
            world,
        )
        return
    what = "the optimizer state" if load_optimizer else "ZeRO-3 weights onto more ranks"
    raise RuntimeError(
        f"checkpoint {path} was written with world size {saved}, now {world}; DeepSpeed cannot reshard "
        f"{what} of a plain ZeRO checkpoint. Resume with {saved} ranks"
        + (
            ", or load weights only (load_optimizer=False: a new optimizer and schedule)"
            if load_optimizer
            else ""
        )
        + f", or start from the consolidated weights (python {root}/zero_to_fp32.py {root} OUT_DIR --tag {tag}), "
        "or convert with DeepSpeed's ds_to_universal.py and load with checkpoint.load_universal"
    )


def load_checkpoint(
    engine: Any,
    root: str | Path,
    tag: str | None = None,
    *,
    load_optimizer: bool = True,
    verify: bool = True,
    fallback: bool = False,
    io_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Restore ``engine`` (weights, and with ``load_optimizer`` optimizer + LR schedule) and this
    rank's RNG from ``root/tag`` (``tag=None``: the latest). Returns the saved ``train_state``.

    Collective. ``load_optimizer=False`` is the warm start of a new curriculum stage: weights
    only, fresh optimizer and schedule (also allowed from a checkpoint written on more ranks).
    Raises FileNotFoundError naming the path when there is nothing to resume from, and
    RuntimeError when the world size differs in a way DeepSpeed cannot reshard.

    ``verify`` checks every file against the checksums in the meta file first (split over
    ranks) and raises :class:`CheckpointCorruptError` naming the damaged files; with
    ``fallback`` it loads the newest older complete checkpoint that verifies instead (warning
    which one), and raises only when none does.
    """
    root = Path(root)
    info = dist_info()
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint root {root} does not exist (resume was requested)")
    if tag is None:
        tag = latest_tag(root)
        if tag is None:
            raise FileNotFoundError(
                f"no checkpoint to resume from in {root}: no '{LATEST}' file and no complete checkpoint directory"
            )
    path = root / tag
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if verify:
        tag = _verified_tag(root, tag, fallback, io_timeout_s)
        path = root / tag
    meta = read_meta(path)

    stage = _zero_stage(engine)
    _check_world_size(path, meta, info.world_size, stage, load_optimizer)

    # DeepSpeed 0.19 pitfall: a ZeRO-3 weights-only load consolidates the weights with
    # get_fp32_state_dict_from_zero_checkpoint(load_dir) *without the tag*, i.e. from whatever
    # `latest` names, silently ignoring an explicit older tag. Point it at a private view whose
    # `latest` names the requested tag.
    view = None
    ds_root = root
    if not load_optimizer and stage >= 3 and read_latest(root) != tag:
        view = Path(tempfile.mkdtemp(prefix="ltscale-ckpt-view-"))
        (view / tag).symlink_to(path.resolve(), target_is_directory=True)
        (view / LATEST).write_text(tag, encoding="utf-8")
        ds_root = view
    try:
        load_path, _client = engine.load_checkpoint(
            str(ds_root),
            tag=tag,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=load_optimizer,
            load_module_only=not load_optimizer,
        )
    finally:
        if view is not None:
            shutil.rmtree(view)  # unlinks the symlink, never follows it
    if load_path is None:
        raise RuntimeError(f"rank {info.rank}: DeepSpeed could not load checkpoint {path}")
    if load_optimizer:
        _sync_lr_from_scheduler(engine)

    rng_file = path / RNG_FILE.format(rank=info.rank)
    if rng_file.is_file():
        restore_rng_state(load_file(str(rng_file)))
    elif meta is None or meta.get("rng", True):
        log.warning("rank %d: %s missing, RNG state not restored", info.rank, rng_file)

    state_file = path / TRAIN_STATE_FILE
    if state_file.is_file():
        with open(state_file, encoding="utf-8") as f:
            train_state = json.load(f)
    else:
        log.warning("%s missing (not an ltscale checkpoint?), returning an empty train_state", state_file)
        train_state = {}
    log.info("rank %d: resumed from %s", info.rank, path)
    return train_state


def _verified_tag(root: Path, tag: str, fallback: bool, io_timeout_s: float | None = None) -> str:
    """``tag`` if it verifies; else (``fallback``) the newest older checkpoint that does. Collective."""
    problems = _verify_collective(root / tag, io_timeout_s)
    if not problems:
        return tag
    done = list_checkpoints(root)
    older = done[: done.index(tag)] if tag in done else done
    older = [t for t in reversed(older) if t != tag]
    if not fallback:
        hint = (
            f"; set resume_fallback=true to resume from the previous complete checkpoint {root / older[0]}, "
            f"or delete {root / tag}"
            if older
            else "; there is no older complete checkpoint to fall back to"
        )
        raise CheckpointCorruptError(root / tag, problems, hint)
    for cand in older:
        bad = _verify_collective(root / cand, io_timeout_s)
        if not bad:
            log.warning(
                "checkpoint %s is damaged (%s); falling back to %s",
                root / tag,
                "; ".join(problems),
                root / cand,
            )
            return cand
        problems += bad
    raise CheckpointCorruptError(root / tag, problems, "; no older complete checkpoint verifies either")


def _sync_lr_from_scheduler(engine: Any) -> None:
    """Put the restored schedule's current LR into the optimizer's param groups.

    LambdaLR.load_state_dict restores its counters but does not write the optimizer's ``lr``.
    DeepSpeed 0.19's ZeRO optimizers restore ``param_groups`` (lr included) themselves, so today
    this is a consistency guard: the schedule, not whatever the optimizer state held, decides
    the LR of the first step after a resume.
    """
    sched = getattr(engine, "lr_scheduler", None)
    opt = getattr(engine, "optimizer", None)
    last = getattr(sched, "_last_lr", None) if sched is not None else None
    if not last or opt is None:
        return
    groups = opt.param_groups
    if len(groups) != len(last):
        log.warning("LR schedule has %d groups, optimizer %d: LR not re-synced", len(last), len(groups))
        return
    for g, lr in zip(groups, last):
        g["lr"] = lr
