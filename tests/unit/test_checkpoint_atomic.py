"""Checkpoint atomicity, discovery, rotation and RNG round trip (single process, fake engine).

The real DeepSpeed save/load under ZeRO-3 is covered by tests/dist/test_engine_dist.py; here a
fake engine writes a file per save so crash points can be simulated cheaply.
"""

from __future__ import annotations

import json
import random
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ltscale.engine.checkpoint as ck


class FakeEngine:
    """The slice of DeepSpeedEngine that checkpoint.py uses."""

    def __init__(self, value: float = 0.0, fail_after_partial: bool = False) -> None:
        self.w = torch.full((3,), value)
        self.global_steps = 0
        self.lr_scheduler = None
        self.optimizer = None
        self.fail_after_partial = fail_after_partial

    def zero_optimization_stage(self) -> int:
        return 3

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        d = ck.Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"w": self.w}, d / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        if self.fail_after_partial:
            raise OSError("disk full (simulated)")
        return True

    def load_checkpoint(self, load_dir, tag, **kw):
        d = ck.Path(load_dir) / tag
        self.w = torch.load(d / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=True)["w"]
        return str(d), {}


def _save(root, tag, value=0.0, **kw):
    return ck.save_checkpoint(FakeEngine(value), root, tag, {"step": value}, **kw)


def test_save_load_roundtrip_restores_state_and_rng(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ck.save_checkpoint(FakeEngine(7.0), tmp_path, "step7", {"step": 7, "nested": {"a": [1, 2.5]}})
    assert path == tmp_path / "step7"
    assert (tmp_path / "latest").read_text() == "step7"
    expect = (random.random(), np.random.rand(), torch.rand(2), random.gauss(0, 1))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)

    eng = FakeEngine()
    state = ck.load_checkpoint(eng, tmp_path)
    assert state == {"step": 7, "nested": {"a": [1, 2.5]}}
    assert torch.equal(eng.w, torch.full((3,), 7.0))
    got = (random.random(), np.random.rand(), torch.rand(2), random.gauss(0, 1))
    assert (
        got[0] == expect[0] and got[1] == expect[1] and torch.equal(got[2], expect[2]) and got[3] == expect[3]
    )
    # RNG file holds tensors only, as safetensors (no pickle anywhere in what we write)
    assert set(load_file(str(path / "rng_rank0.safetensors"))) >= {
        "torch_cpu",
        "python_mt",
        "numpy_keys",
    }
    meta = json.loads((path / ck.META_FILE).read_text())
    assert meta["world_size"] == 1 and meta["tag"] == "step7"


def test_crash_before_commit_leaves_latest_on_previous(tmp_path, monkeypatch):
    _save(tmp_path, "step1", 1.0)

    def crash(*a, **k):
        raise RuntimeError("killed before rename (simulated)")

    monkeypatch.setattr(ck, "_commit", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        _save(tmp_path, "step2", 2.0)
    assert (tmp_path / ".tmp-step2").is_dir()  # partial save is there...
    assert not (tmp_path / "step2").exists()
    assert (tmp_path / "latest").read_text() == "step1"  # ...but nothing points to it
    assert ck.latest_tag(tmp_path) == "step1"
    assert ck.list_checkpoints(tmp_path) == ["step1"]
    eng = FakeEngine()
    assert ck.load_checkpoint(eng, tmp_path) == {"step": 1.0}

    monkeypatch.undo()
    _save(tmp_path, "step3", 3.0)  # next save cleans the leftover
    assert not (tmp_path / ".tmp-step2").exists()
    assert ck.latest_tag(tmp_path) == "step3"


def test_crash_inside_engine_save(tmp_path):
    _save(tmp_path, "step1", 1.0)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(FakeEngine(2.0, fail_after_partial=True), tmp_path, "step2", {})
    assert ck.latest_tag(tmp_path) == "step1"
    assert not (tmp_path / "step2").exists()


def test_crash_between_rename_and_latest(tmp_path, monkeypatch):
    _save(tmp_path, "step1", 1.0)

    def crash(*a, **k):
        raise RuntimeError("killed before latest (simulated)")

    monkeypatch.setattr(ck, "_write_latest", crash)
    with pytest.raises(RuntimeError):
        _save(tmp_path, "step2", 2.0)
    # step2 is complete (renamed after all writes), latest still names the complete step1.
    assert ck.list_checkpoints(tmp_path) == ["step1", "step2"]
    assert ck.latest_tag(tmp_path) == "step1"
    (tmp_path / "latest").unlink()
    assert ck.latest_tag(tmp_path) == "step2"  # no pointer: newest complete
    (tmp_path / "latest").write_text("gone")
    assert ck.latest_tag(tmp_path) == "step2"  # dangling pointer: newest complete


def test_resave_same_tag_replaces(tmp_path):
    _save(tmp_path, "step1", 1.0)
    _save(tmp_path, "step1", 5.0)
    eng = FakeEngine()
    assert ck.load_checkpoint(eng, tmp_path, "step1") == {"step": 5.0}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_rotation_keeps_last_n_and_never_touches_symlink_targets(tmp_path):
    root = tmp_path / "ckpt"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ck.META_FILE).write_text(json.dumps({"saved_at_ns": 0}))
    (outside / "precious.bin").write_bytes(b"x")

    _save(root, "step1", 1.0)
    (root / "best").symlink_to(root / "step1")  # a "best" pointer protects step1
    (root / "step0").symlink_to(outside)  # a symlinked checkpoint-looking dir is never ours
    (root / "notes").mkdir()  # not ours: no meta file
    (root / "notes" / "keep.txt").write_text("mine")
    _save(root, "step2", 2.0)
    (root / "step2" / "link_out").symlink_to(outside)  # a symlink inside a rotated dir

    for i in (3, 4, 5):
        _save(root, f"step{i}", float(i), keep_last_n=2)

    assert ck.list_checkpoints(root) == ["step1", "step4", "step5"]
    assert not (root / "step2").exists() and not (root / "step3").exists()
    assert (outside / "precious.bin").read_bytes() == b"x"
    assert (root / "step0").is_symlink() and (root / "best").is_symlink()
    assert (root / "notes" / "keep.txt").read_text() == "mine"
    assert ck.latest_tag(root) == "step5"
    with pytest.raises(ValueError, match="keep_last_n"):
        _save(root, "step6", keep_last_n=0)


def test_missing_root_or_tag_raise_file_not_found_naming_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ck.load_checkpoint(FakeEngine(), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        ck.load_checkpoint(FakeEngine(), tmp_path)
    _save(tmp_path, "step1")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "step9")):
        ck.load_checkpoint(FakeEngine(), tmp_path, "step9")


def test_world_size_mismatch_is_a_clear_error(tmp_path):
    path = _save(tmp_path, "step1")
    meta = json.loads((path / ck.META_FILE).read_text())
    meta["world_size"] = 2
    (path / ck.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="world size 2, now 1"):
        ck.load_checkpoint(FakeEngine(), tmp_path)


@pytest.mark.parametrize("tag", [".hidden", "a/b", "latest", "", "../up"])
def test_bad_tags_rejected(tmp_path, tag):
    with pytest.raises(ValueError, match="tag"):
        _save(tmp_path, tag)


def test_non_json_train_state_names_key_and_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match="data.loss"):
        ck.save_checkpoint(FakeEngine(), tmp_path, "step1", {"data": {"loss": torch.tensor(1.0)}})
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_write_json_atomic(tmp_path):
    p = ck.write_json_atomic(tmp_path / "sub" / "x.json", {"a": 1})
    ck.write_json_atomic(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert [q.name for q in p.parent.iterdir()] == ["x.json"]
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    ("saved", "now", "stage", "full", "ok"),
    [
        (2, 1, 3, True, False),  # optimizer state never reshards
        (2, 1, 3, False, True),  # ZeRO-3 weights-only onto fewer ranks: DeepSpeed consolidates
        (2, 4, 3, False, False),  # ... onto more ranks: DeepSpeed fails with a bare AssertionError
        (2, 4, 2, False, True),  # stages 0-2 keep whole weights
    ],
)
def test_world_size_rules(tmp_path, saved, now, stage, full, ok):
    meta = {"world_size": saved}
    if ok:
        ck._check_world_size(tmp_path / "step1", meta, now, stage, full)
    else:
        with pytest.raises(RuntimeError, match=f"world size {saved}, now {now}"):
            ck._check_world_size(tmp_path / "step1", meta, now, stage, full)


def test_zero3_weights_only_load_sees_requested_tag_as_latest(tmp_path):
    """DeepSpeed's ZeRO-3 weights-only path reads `<load_dir>/latest`, not the tag it is given."""
    _save(tmp_path, "step1", 1.0)
    _save(tmp_path, "step2", 2.0)
    seen = {}

    class Recorder(FakeEngine):
        def load_checkpoint(self, load_dir, tag, **kw):
            seen["latest"] = (ck.Path(load_dir) / "latest").read_text()
            seen["module_only"] = kw["load_module_only"]
            return super().load_checkpoint(load_dir, tag, **kw)

    eng = Recorder()
    assert ck.load_checkpoint(eng, tmp_path, "step1", load_optimizer=False) == {"step": 1.0}
    assert seen == {"latest": "step1", "module_only": True}
    assert torch.equal(eng.w, torch.full((3,), 1.0))
    assert (tmp_path / "latest").read_text() == "step2"  # the real pointer is untouched
    assert (tmp_path / "step1").is_dir()  # removing the view did not follow its symlink


# --------------------------------------------------------------------------- integrity (checksums)

SHARD = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def _flip(p):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-7])


@pytest.mark.parametrize(
    ("damage", "file", "reason"),
    [
        (_flip, SHARD, "contents changed"),
        (_truncate, SHARD, "truncated"),
        (lambda p: p.unlink(), SHARD, "missing"),
        (_flip, "rng_rank0.safetensors", "contents changed"),
        (_truncate, ck.TRAIN_STATE_FILE, "truncated"),
    ],
)
def test_damaged_file_is_named_and_fallback_loads_previous(tmp_path, damage, file, reason):
    _save(tmp_path, "step1", 1.0)
    _save(tmp_path, "step2", 2.0)
    meta = json.loads((tmp_path / "step2" / ck.META_FILE).read_text())
    assert set(meta["files"]) == {SHARD, "rng_rank0.safetensors", ck.TRAIN_STATE_FILE}
    assert ck.verify_checkpoint(tmp_path / "step2") == []
    damage(tmp_path / "step2" / file)
    bad = tmp_path / "step2" / file
    problems = ck.verify_checkpoint(tmp_path / "step2")
    assert len(problems) == 1 and problems[0].startswith(f"{bad}: {reason}")

    eng = FakeEngine(-1.0)
    with pytest.raises(ck.CheckpointCorruptError, match=rf"{bad}: {reason}.*resume_fallback=true.*step1"):
        ck.load_checkpoint(eng, tmp_path)
    assert torch.equal(eng.w, torch.full((3,), -1.0))  # nothing was loaded from the damaged checkpoint
    assert ck.load_checkpoint(eng, tmp_path, fallback=True) == {"step": 1.0}
    assert torch.equal(eng.w, torch.full((3,), 1.0))


def test_fallback_without_an_intact_older_checkpoint_fails_naming_all(tmp_path):
    _save(tmp_path, "step1", 1.0)
    _save(tmp_path, "step2", 2.0)
    _flip(tmp_path / "step1" / SHARD)
    (tmp_path / "step2" / "rng_rank0.safetensors").unlink()
    with pytest.raises(
        ck.CheckpointCorruptError, match=r"step2/rng_rank0\.safetensors: missing.*step1/zero_pp.*no older"
    ):
        ck.load_checkpoint(FakeEngine(), tmp_path, fallback=True)
    with pytest.raises(ck.CheckpointCorruptError, match="no older complete checkpoint to fall back to"):
        ck.load_checkpoint(FakeEngine(), tmp_path, "step1")


def test_checkpoint_without_checksums_still_loads(tmp_path, caplog):
    path = _save(tmp_path, "step1", 1.0)
    meta = json.loads((path / ck.META_FILE).read_text())
    del meta["files"]
    (path / ck.META_FILE).write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        assert ck.load_checkpoint(FakeEngine(), tmp_path) == {"step": 1.0}
    assert "no checksums" in caplog.text


def test_hash_share_splits_files_by_rank_in_name(tmp_path):
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
                 "bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt", "rng_rank1.pt", "train_state.json"):  # fmt: skip
        (tmp_path / name).write_bytes(name.encode())
    shares = [set(ck.hash_share(tmp_path, r, 2)) for r in (0, 1)]
    assert shares[0] == {"zero_pp_rank_0_mp_rank_00_model_states.pt", "train_state.json"}
    assert shares[1] == {"zero_pp_rank_1_mp_rank_00_model_states.pt", "rng_rank1.pt",
                         "bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt"}  # fmt: skip
    assert ck.hash_share(tmp_path, 0, 1)["rng_rank1.pt"]["size"] == len(b"rng_rank1.pt")


# --------------------------------------------------------------------------- security


def test_files_and_dirs_follow_the_users_umask(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        path = _save(tmp_path / "ckpt", "step1", 1.0)
    finally:
        os.umask(old)
    for p in [tmp_path / "ckpt", path, *path.iterdir(), tmp_path / "ckpt" / "latest"]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o007 == 0, f"{p}: {oct(mode)} is world-accessible under umask 027"
        assert mode & 0o040, f"{p}: {oct(mode)} is not group-readable (umask 027 allows it)"


def test_leftover_cleanup_never_follows_symlinks_out_of_the_root(tmp_path):
    root, outside = tmp_path / "ckpt", tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_bytes(b"x")
    root.mkdir()
    (root / ".tmp-step9").symlink_to(outside, target_is_directory=True)  # looks like a crashed save
    (root / ".trash-step8").symlink_to(outside / "precious.bin")
    _save(root, "step1", 1.0)
    assert (outside / "precious.bin").read_bytes() == b"x"
    assert not (root / ".tmp-step9").exists() and not (root / ".tmp-step9").is_symlink()
    (root / "step2").symlink_to(outside, target_is_directory=True)
    with pytest.raises(FileExistsError, match="symlink"):
        _save(root, "step2", 2.0)  # never replaces (or deletes through) a symlinked checkpoint name
    assert (outside / "precious.bin").read_bytes() == b"x"


def test_symlinked_file_inside_a_checkpoint_fails_verification(tmp_path):
    path = _save(tmp_path, "step1", 1.0)
    real = tmp_path / "elsewhere.pt"
    (path / SHARD).rename(real)
    (path / SHARD).symlink_to(real)  # same bytes, but not a file of this checkpoint
    assert ck.verify_checkpoint(path) == [f"{path / SHARD}: missing"]
