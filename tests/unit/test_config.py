"""Config loading: YAML + dotted overrides, unknown keys and bad values named by their dotted key."""

from __future__ import annotations

import pytest
import yaml

from ltscale.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    default_config_path,
    load_config,
    save_resolved,
)


def test_default_config_loads_and_has_three_stages():
    cfg = load_config(None)
    assert [s.mode for s in cfg.stages] == ["cot", "hidden", "fusion"]
    assert cfg.stages[2].alpha == 0.6 and cfg.stages[2].top_p == 0.9
    assert default_config_path().name == "tiny.yaml"


def test_overrides_reach_list_items_and_nested_keys():
    cfg = load_config(None, ["stages.2.alpha=0.25", "train.micro_batch_size=4", "model.init.hidden_size=48",
                             "data.synthetic.n_train=10"])
    assert cfg.stages[2].alpha == 0.25
    assert cfg.train.micro_batch_size == 4
    assert cfg.model.init["hidden_size"] == 48
    assert cfg.data.synthetic.n_train == 10


@pytest.mark.parametrize("override,key", [
    ("train.micro_batchsize=3", "train.micro_batchsize: unknown key"),
    ("stages.7.alpha=0.1", "stages.7: no such list index"),
    ("stages.2.alpha=1.5", "stages.2.alpha"),
    ("stages.2.top_p=0", "stages.2.top_p"),
    ("stages.1.mode=dream", "stages.1.mode"),
    ("train.micro_batch_size=two", "train.micro_batch_size: expected an integer"),
    ("optim.stage_strategy=sometimes", "optim.stage_strategy"),
    ("engine.fused=maybe", "engine.fused"),
    ("train.global_batch_size=33", "train.global_batch_size"),
    ("stages.1.tau=0", "stages.1: a latent stage"),
    ("resume=perhaps", "resume"),
])  # fmt: skip
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"tokenizer": "sentencepiece", "init": {"hidden_size": 8}, "dropout": 0.1}}))
    with pytest.raises(ConfigError, match=r"model\.dropout: unknown key"):
        load_config(p)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["stages.2.alpha=0.3"])
    path = save_resolved(cfg, tmp_path)
    again = config_from_dict(yaml.safe_load(path.read_text()))
    assert again == cfg and isinstance(again, RunConfig)


def test_diff_configs_names_changed_keys():
    from ltscale.config import diff_configs

    a = load_config(None).to_dict()
    b = load_config(None, ["stages.2.alpha=0.1", "train.log_every=3"]).to_dict()
    assert diff_configs(a, b) == ["stages.2.alpha", "train.log_every"]
    assert diff_configs(a, a) == []
