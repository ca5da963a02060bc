"""Config loading: YAML + dotted overrides, unknown keys and bad values named by their dotted key."""

from __future__ import annotations

import pytest
import yaml

from ltscale.config import ConfigError, RunConfig, default_config_path, save_resolved
from ltscale.run_config import config_from_dict, load_config


def test_default_config_loads_and_has_three_stages():
    cfg = load_config(None)
    assert [s.mode for s in cfg.stages] == ["cot", "hidden", "fusion"]
    assert cfg.stages[2].alpha == 0.6 and cfg.stages[2].top_p == 0.9
    assert default_config_path().name == "tiny.yaml"


def test_overrides_reach_list_items_and_nested_keys():
    cfg = load_config(
        None,
        [
            "stages.2.alpha=0.25",
            "train.micro_batch_size=4",
            "model.init.hidden_size=48",
            "data.synthetic.n_train=10",
        ],
    )
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
    p.write_text(
        yaml.safe_dump({"model": {"tokenizer": "sentencepiece", "init": {"hidden_size": 8}, "dropout": 0.1}})
    )
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


# Table of bad configs (issue 9): each must fail with ONE ConfigError whose message starts with the key.
BAD_CONFIGS = [
    # unknown keys, at every level
    ({"trian": {}}, "trian: unknown key"),
    ({"train": {"micro_batch": 4}}, "train.micro_batch: unknown key"),
    ({"stages": [{"mode": "cot", "alpah": 0.5}]}, "stages.0.alpah: unknown key"),
    ({"data": {"synthetic": {"n_trian": 4}}}, "data.synthetic.n_trian: unknown key"),
    # wrong types
    ({"train": {"grad_accum": 1.5}}, "train.grad_accum: expected an integer"),
    ({"train": {"grad_accum": True}}, "train.grad_accum: expected an integer"),
    ({"data": {"strict": "yes"}}, "data.strict: expected true/false"),
    ({"optim": {"lr": "fast"}}, "optim.lr: expected a number"),
    ({"optim": {"betas": 0.9}}, "optim.betas: expected a list"),
    ({"stages": {"mode": "cot"}}, "stages: expected a list"),
    ({"model": "tiny"}, "model: expected a mapping"),
    ({"run_dir": None}, "run_dir: must not be null"),
    ({"resume_fallback": "true"}, "resume_fallback: expected true/false"),
    # impossible batch arithmetic / counts
    ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size: 0 must be >= 1"),
    ({"train": {"grad_accum": 0}}, "train.grad_accum"),
    ({"train": {"micro_batch_size": 4, "grad_accum": 2, "global_batch_size": 12}}, "train.global_batch_size: 12 is not"),
    ({"train": {"global_batch_size": 0}}, "train.global_batch_size: 0 must be >= 1"),
    ({"train": {"keep_last_n": 0}}, "train.keep_last_n"),
    ({"train": {"save_every": 0}}, "train.save_every"),
    ({"train": {"max_skipped_steps": -1}}, "train.max_skipped_steps"),
    ({"engine": {"collective_timeout_s": 0}}, "engine.collective_timeout_s"),
    ({"optim": {"lr": 0}}, "optim.lr: 0.0 must be > 0"),
    ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas.1"),
    ({"optim": {"betas": [0.9]}}, "optim.betas: expected two"),
    ({"eval": {"batch_size": 0}}, "eval.batch_size"),
    # stage ordering and ranges
    ({"stages": []}, "stages: at least one"),
    ({"stages": [{"mode": "fusion", "tau": 0.2, "max_sites": 2, "insert_prob": 0.5}, {"mode": "cot"}]},
     "stages.1.mode: 'cot' after stages.0.mode 'fusion'"),
    ({"stages": [{"mode": "cot"}, {"mode": "fusion", "tau": 0.2, "max_sites": 2, "insert_prob": 0.5},
                 {"mode": "hidden", "tau": 0.2, "max_sites": 2, "insert_prob": 0.5}]},
     "stages.2.mode: 'hidden' after stages.1.mode 'fusion'"),
    ({"stages": [{"mode": "cot", "alpha": -0.1}]}, "stages.0.alpha: -0.1 outside [0, 1]"),
    ({"stages": [{"mode": "cot", "alpha": 1.01}]}, "stages.0.alpha"),
    ({"stages": [{"mode": "cot", "top_p": 0.0}]}, "stages.0.top_p: 0.0 outside (0, 1]"),
    ({"stages": [{"mode": "cot", "top_p": 1.5}]}, "stages.0.top_p"),
    ({"stages": [{"mode": "cot", "epochs": 0}]}, "stages.0.epochs"),
    ({"stages": [{"mode": "dream"}]}, "stages.0.mode"),
]  # fmt: skip


@pytest.mark.parametrize(("patch", "message"), BAD_CONFIGS)
def test_bad_config_table(patch, message):
    raw = yaml.safe_load(default_config_path().read_text())
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)  # one error, one line


def test_edge_values_are_accepted():
    cfg = load_config(None, ["stages.2.alpha=0", "stages.2.top_p=1", "stages.1.alpha=1", "train.max_skipped_steps=0",
                             "resume_fallback=true", "train.global_batch_size=32"])  # fmt: skip
    assert cfg.stages[2].alpha == 0.0 and cfg.stages[2].top_p == 1.0 and cfg.resume_fallback is True


def test_yaml_on_off_stay_strings_and_only_true_false_are_booleans(tmp_path):
    """YAML 1.1 reads on/off/yes/no as booleans; ``engine.fused: on`` must mean the string."""
    path = tmp_path / "c.yaml"
    text = default_config_path().read_text()
    assert "\nengine:\n" in text
    path.write_text(text.replace("\nengine:\n", "\nengine:\n  fused: on\n"))
    cfg = load_config(path, ["engine.fused=off", "model.adapter=true"])
    assert cfg.engine.fused == "off" and cfg.model.adapter is True
    assert load_config(path).engine.fused == "on"
    with pytest.raises(ConfigError, match=r"model\.adapter: expected true/false, got 'yes'"):
        load_config(path, ["model.adapter=yes"])


def test_removed_hidden_layer_key_says_what_to_do(tmp_path):
    """``model.hidden_layer`` had one legal value; setting it (file or override) is a clear error."""
    raw = yaml.safe_load(default_config_path().read_text())
    raw["model"]["hidden_layer"] = -1
    with pytest.raises(
        ConfigError, match=r"^model\.hidden_layer: not a key: the latent input is always the last"
    ):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match=r"^model\.hidden_layer: not a key"):
        load_config(None, ["model.hidden_layer=-1"])
