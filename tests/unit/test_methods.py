"""The method switch: registry, config rewrites of the ablations (idempotent), bad input before any
training, and the `ltscale compare` protocol (every method starts from the one CoT checkpoint)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ltscale.compare import ALL, run_config
from ltscale.config import ConfigError
from ltscale.methods import METHOD_NAMES, get_method, resolve_method
from ltscale.run_config import config_from_dict, load_config
from ltscale.train import main as train_main

REPO = Path(__file__).resolve().parents[2]


def test_every_registered_method_loads_and_has_a_tiny_config():
    for name in METHOD_NAMES:
        assert get_method(name).name == name
    for f in sorted((REPO / "configs").glob("tiny*.yaml")):
        cfg = load_config(f)
        assert cfg.method in METHOD_NAMES, f
    assert set(ALL) == set(METHOD_NAMES)  # compare covers every method


@pytest.mark.parametrize("method, modes, adapter", [
    ("lt_tuning", ["cot", "hidden", "fusion"], False),
    ("cot", ["cot"], False),
    ("pause", ["cot", "pause", "pause"], False),
    ("no_stage3", ["cot", "hidden"], False),
    ("adapter", ["cot", "hidden", "fusion"], True),
])  # fmt: skip
def test_ablations_are_one_switch_on_the_lt_tuning_config(method, modes, adapter):
    cfg = load_config(None, [f"method={method}"])
    assert [st.mode for st in cfg.stages] == modes and cfg.model.adapter is adapter
    if method == "pause":  # same confidence insertion as LT-Tuning
        lt = load_config(None)
        assert [dataclasses.replace(s, mode="x") for s in cfg.stages[1:]] == [
            dataclasses.replace(s, mode="x") for s in lt.stages[1:]
        ]
    again = resolve_method(cfg)  # idempotent: a resumed run's saved config resolves to itself
    assert again.to_dict() == cfg.to_dict()
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_unknown_method_is_a_config_error_before_training(capsys):
    with pytest.raises(ConfigError, match=r"^method: 'coconut2' is not one of lt_tuning, cot, "):
        load_config(None, ["method=coconut2"])
    assert train_main(["method=coconut2", "run_dir=/nonexistent/never-created"]) == 2
    assert "config error: method: 'coconut2'" in capsys.readouterr().err
    assert not Path("/nonexistent/never-created").exists()


def test_ablations_refuse_configs_without_what_they_ablate():
    with pytest.raises(ConfigError, match=r"^stages: method 'no_stage3' needs a stage with mode: hidden"):
        load_config(None, ["method=no_stage3", "stages.1.mode=fusion"])
    with pytest.raises(ConfigError, match=r"^stages: method 'cot' needs"):
        load_config(
            None,
            [
                "method=cot",
                "stages.0.mode=hidden",
                "stages.0.tau=0.3",
                "stages.0.max_sites=2",
                "stages.0.insert_prob=0.5",
            ],
        )


def test_compare_runs_start_from_the_cot_checkpoint(tmp_path):
    cot_hf = tmp_path / "cot" / "stage1" / "hf"
    cot = run_config("cot", tmp_path, cot_hf, ["model.init.hidden_size=32"])
    assert cot.model.name_or_path is None and cot.model.init["hidden_size"] == 32
    for m in ("lt_tuning", "pause", "no_stage3", "adapter", "coconut", "softcot"):
        cfg = run_config(m, tmp_path, cot_hf, ["model.init.hidden_size=32", "train.max_steps_per_stage=2"])
        assert cfg.model.name_or_path == str(cot_hf) and cfg.run_dir == str(tmp_path / m)
        assert cfg.train.max_steps_per_stage == 2 and cfg.eval.after_each_stage is False
        assert m == "softcot" or "cot" not in [st.mode for st in cfg.stages]
    coconut = run_config("coconut", tmp_path, cot_hf, [])
    assert coconut.coconut.start_stage == 1 and len(coconut.stages) == 4
    assert Path(run_config("softcot", tmp_path, cot_hf, []).softcot.assistant).is_file()
