"""render_ds_config: "auto" filling, batch arithmetic, conflicts, template lookup."""

from __future__ import annotations

import copy
import json
import os

import pytest

from ltscale.engine.ds_config import (
    TEMPLATE_NAMES,
    render_ds_config,
    resolve_template,
    write_ds_config,
    zero_stage,
)

os.environ.setdefault("DS_ACCELERATOR", "cpu")

ARGS = dict(micro_batch=2, grad_accum=3, world_size=4, grad_clip=0.5, precision="fp32")


def _render(template="zero3", **kw):
    return render_ds_config(template, **{**ARGS, **kw})


def _has_auto(obj) -> bool:
    if isinstance(obj, dict):
        return any(_has_auto(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_auto(v) for v in obj)
    return obj == "auto"


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_templates_render_and_validate_in_deepspeed(name):
    cfg = _render(name)
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 2 * 3 * 4
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    assert not _has_auto(cfg)
    assert not any(k.startswith("_") for k in cfg)
    assert cfg["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)
    # DeepSpeed's own schema (pydantic, extra keys forbidden) accepts the rendered template.
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = DeepSpeedConfig(_render(name, world_size=1))
    assert ds.zero_optimization_stage == zero_stage(cfg)
    assert ds.train_batch_size == 6


def test_zero3_knobs_reuse_params_across_passes():
    z = _render("zero3")["zero_optimization"]
    assert z["stage3_gather_16bit_weights_on_model_save"] is True
    assert z["stage3_max_reuse_distance"] >= 8.1e9  # > Llama-3.1-8B numel: gathered once per step
    assert z["stage3_max_live_parameters"] >= z["stage3_max_reuse_distance"]
    assert z["stage3_param_persistence_threshold"] <= 1e4
    assert "offload_optimizer" in _render("zero3_offload")["zero_optimization"]


def test_precision_fills_sections():
    assert _render(precision="bf16")["bf16"]["enabled"] is True
    cfg = _render(precision="fp16")
    assert cfg["fp16"]["enabled"] is True and cfg["bf16"]["enabled"] is False
    assert _render(precision="auto")["bf16"]["enabled"] is False  # CPU -> fp32
    with pytest.raises(ValueError, match="precision"):
        _render(precision="fp8")


def test_bad_batch_arithmetic_names_keys():
    tmpl = json.loads(resolve_template("zero3").read_text())
    tmpl["train_batch_size"] = 20
    with pytest.raises(ValueError) as e:
        render_ds_config(tmpl, **ARGS)
    msg = str(e.value)
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "world_size",
    ):
        assert key in msg
    assert "24" in msg  # the correct product


def test_explicit_value_conflicting_with_run_config_names_key():
    for key, val in (
        ("train_micro_batch_size_per_gpu", 8),
        ("gradient_accumulation_steps", 1),
        ("gradient_clipping", 1.0),
    ):
        with pytest.raises(ValueError, match=key):
            _render(overrides={key: val})
    with pytest.raises(ValueError, match=r"bf16\.'enabled'"):
        _render(overrides={"bf16": {"enabled": True}})
    # agreeing explicit values are fine
    assert _render(overrides={"train_batch_size": 24, "gradient_clipping": 0.5})["train_batch_size"] == 24


def test_leftover_auto_is_an_error_with_dotted_key():
    with pytest.raises(ValueError, match=r"zero_optimization\.reduce_bucket_size"):
        _render(overrides={"zero_optimization": {"reduce_bucket_size": "auto"}})


def test_overrides_dotted_and_nested_and_no_mutation():
    tmpl = json.loads(resolve_template("zero3").read_text())
    before = copy.deepcopy(tmpl)
    cfg = render_ds_config(
        tmpl,
        **ARGS,
        overrides={
            "zero_optimization.stage3_param_persistence_threshold": 0,
            "zero_optimization": {"stage": 2},
        },
    )
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["overlap_comm"] is True  # nested merge keeps siblings
    assert tmpl == before
    with pytest.raises(ValueError, match="not a section"):
        _render(overrides={"steps_per_print.x": 1})


@pytest.mark.parametrize(
    "bad", [dict(micro_batch=0), dict(grad_accum=-1), dict(world_size=1.5), dict(grad_clip=-1)]
)
def test_argument_validation(bad):
    with pytest.raises(ValueError):
        _render(**bad)


def test_resolve_template_names_paths_and_errors(tmp_path):
    p = resolve_template("zero3")
    assert p.name == "zero3.json" and p.is_file()
    assert resolve_template("zero3.json") == p
    assert resolve_template(p) == p
    with pytest.raises(FileNotFoundError, match="zero9"):
        resolve_template("zero9")
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  oops\n}")
    with pytest.raises(ValueError, match=r"bad\.json:2"):
        render_ds_config(bad, **ARGS)


def test_write_ds_config_roundtrip(tmp_path):
    cfg = _render()
    out = write_ds_config(cfg, tmp_path / "run" / "ds_config.json")
    assert json.loads(out.read_text()) == cfg
    assert [p.name for p in out.parent.iterdir()] == ["ds_config.json"]  # no temp files left
