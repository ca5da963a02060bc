"""The paper recipes (``configs/paper/*.yaml``), checked without the hardware.

What CPU proves here: each recipe resolves under every method, holds the official hyperparameters,
renders a valid DeepSpeed config with the paper's global batch on 1, 4 and 8 nodes of 8 GPUs, and
builds its ``LatentLM`` at full size (real Llama architecture from ``tests/fixtures/paper_models``,
vocabulary padded to 128,320 rows, tied or not) on the ``meta`` device through the product's own
``build_latent_model``; a stage-3 forward+backward at full shape runs there too, packed and padded.
What it cannot prove: numerics, speed and memory on a GPU (``meta`` tensors hold no data), that
the hub weights download, or that the run fits in memory (``ltscale plan`` estimates that).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ltscale.batching import resolve_batch
from ltscale.engine.ds_config import render_ds_config, resolve_template, zero_stage
from ltscale.methods import METHOD_NAMES, get_method
from ltscale.run_config import load_config
from ltscale.run_setup import RunData, build_latent_model

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs" / "paper").glob("*.yaml"))
FIXTURES = REPO / "tests" / "fixtures" / "paper_models"
LLAMA3_TOKENS = 128256
# name -> (hub name, parameters of the shipped model, tied, epochs per stage)
PAPER = {
    "llama-3.2-1b-instruct": ("meta-llama/Llama-3.2-1B-Instruct", 1_235_814_400, True, [1, 2, 7]),
    "llama-3.2-3b-instruct": ("meta-llama/Llama-3.2-3B-Instruct", 3_212_749_824, True, [1, 2, 7]),
    "llama-3.1-8b-instruct": ("meta-llama/Llama-3.1-8B-Instruct", 8_030_261_248, False, [1, 1, 3]),
}
# The overrides README's "Reproducing the paper" table gives a method beyond the recipe.
METHOD_ARGS = {
    "coconut": ["coconut.start_stage=1", "model.name_or_path=runs/cot/stage1/hf", "optim.lr=1.0e-4",
                "optim.schedule=constant", "optim.warmup_ratio=0", "optim.stage_strategy=reset",
                "stages=[{epochs: 3}, {epochs: 3}, {epochs: 3}, {epochs: 13}]"],
    "softcot": ["model.name_or_path=runs/cot/stage1/hf", "stages=[{epochs: 3}]"],
}  # fmt: skip


def recipe_id(path: Path) -> str:
    return path.stem


def test_the_three_paper_scales_have_recipes():
    assert [p.stem for p in RECIPES] == sorted(PAPER)


@pytest.mark.parametrize("path", RECIPES, ids=recipe_id)
def test_recipe_holds_the_official_settings(path):
    cfg = load_config(path)
    hub, _, _, epochs = PAPER[path.stem]
    assert cfg.method == "lt_tuning" and cfg.model.name_or_path == hub
    assert (cfg.model.dtype, cfg.engine.precision, cfg.model.use_chat_template) == ("bf16", "bf16", True)
    assert cfg.model.pad_vocab_to_multiple_of == 64 and cfg.model.attn_implementation == "sdpa"
    o = cfg.optim
    assert (o.lr, o.schedule, o.warmup_ratio, o.weight_decay, o.stage_strategy) == (2e-5, "cosine", 0.1, 0.01,
                                                                                     "continue")  # fmt: skip
    assert (o.max_grad_norm, o.betas) == (1.0, [0.9, 0.999])
    t = cfg.train
    assert t.global_batch_size == t.micro_batch_size * t.grad_accum * 4 == 64 and t.seed == 42  # on 4 GPUs
    assert (t.micro_batch_size, t.grad_accum) == ((4, 4) if "8b" in path.stem else (8, 2))  # 8B: memory
    assert [s.mode for s in cfg.stages] == ["cot", "hidden", "fusion"]
    assert [s.epochs for s in cfg.stages] == epochs
    assert [(s.tau, s.max_sites, s.insert_prob, s.double_insert_prob) for s in cfg.stages[1:]] == [
        (0.3, 6, 0.85, 0.15), (0.2, 8, 0.95, 0.20)]  # fmt: skip
    fusion = cfg.stages[2]
    assert (fusion.alpha, fusion.temperature, fusion.top_p, fusion.lr_scale) == (0.6, 1.0, 0.9, 1.0)
    assert cfg.data.train == "whynlp/gsm8k-aug"


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("path", RECIPES, ids=recipe_id)
def test_every_method_resolves_from_the_same_file(path, method):
    cfg = load_config(path, [f"method={method}", *METHOD_ARGS.get(method, [])])
    assert cfg.method == method and cfg.stages
    assert cfg.train.global_batch_size == 64 and cfg.optim.lr == (1e-4 if method == "coconut" else 2e-5)
    assert cfg.model.adapter == (method == "adapter")
    if method in ("cot", "soft_thinking"):
        assert [s.mode for s in cfg.stages] == ["cot"]
    if method == "no_stage3":
        assert [s.mode for s in cfg.stages] == ["cot", "hidden"]
    if method == "pause":
        assert [s.mode for s in cfg.stages] == ["cot", "pause", "pause"]


@pytest.mark.parametrize("nodes", [1, 4, 8])
@pytest.mark.parametrize("path", RECIPES, ids=recipe_id)
def test_deepspeed_config_keeps_the_paper_batch_on_8_gpu_nodes(path, nodes):
    world = nodes * 8
    cfg = resolve_batch(load_config(path), world)
    t = cfg.train
    ds = render_ds_config(resolve_template(cfg.engine.ds_config), micro_batch=t.micro_batch_size,
                          grad_accum=t.grad_accum, world_size=world, grad_clip=cfg.optim.max_grad_norm,
                          precision=cfg.engine.precision)  # fmt: skip
    assert ds["train_batch_size"] == 64
    cap = load_config(path).train.micro_batch_size  # as written; the layout derives from it
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == {
        8: (min(cap, 8), 8 // min(cap, 8)), 32: (2, 1), 64: (1, 1)}[world]  # fmt: skip
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 1.0 and zero_stage(ds) in (2, 3)
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeed's own schema accepts the template (its batch check takes this process's world size: 1)
    one = render_ds_config(resolve_template(cfg.engine.ds_config), micro_batch=t.micro_batch_size,
                           grad_accum=t.grad_accum, world_size=1, grad_clip=1.0, precision="bf16")  # fmt: skip
    assert DeepSpeedConfig(one).zero_optimization_stage == zero_stage(ds)


class _Tokenizer:
    """What building the model asks of Llama-3's tokenizer: its size and two one-token strings."""

    eos_token_id = 128009
    pad_token_id = 128004

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return {"emm": [3906], "<<": [2501]}.get(text, [0, 1])


def fixture_config(hub: str, **changes):
    return AutoConfig.from_pretrained(FIXTURES / hub.split("/")[-1], **changes)


def meta_latent_model(cfg, monkeypatch, **changes):
    """``build_latent_model`` as the trainer calls it, with the base model (and SoftCoT's assistant)
    built on ``meta`` from the fixture architecture (``changes`` applied) instead of downloaded."""
    from ltscale import run_setup
    from ltscale.methods import softcot

    dtype = {"bf16": torch.bfloat16}[cfg.model.dtype]

    def on_meta(name_or_path, **_):
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(fixture_config(name_or_path, **changes), dtype=dtype,
                                                    attn_implementation=cfg.model.attn_implementation)  # fmt: skip

    monkeypatch.setattr(run_setup, "build_base_model", lambda **kw: on_meta(**kw))
    monkeypatch.setattr(softcot, "build_assistant", lambda spec, tokenizer, seed: on_meta(spec))
    method = get_method(cfg.method)
    extra = method.extra_tokens(cfg)
    tok = _Tokenizer(LLAMA3_TOKENS + 1 + len(extra))
    data = RunData(tokenizer=tok, thinking_id=LLAMA3_TOKENS, train=[], eval_records=[],
                   special_ids={t: LLAMA3_TOKENS + 1 + i for i, t in enumerate(extra)})  # fmt: skip
    return build_latent_model(cfg, data), tok


@pytest.mark.parametrize("method", ["lt_tuning", "adapter", "coconut", "softcot"])
@pytest.mark.parametrize("path", RECIPES, ids=recipe_id)
def test_full_size_latent_model_builds_on_meta(path, method, monkeypatch):
    cfg = load_config(path, [f"method={method}"])  # the hub base model (the overrides start from a run)
    hub, n_params, tied, _ = PAPER[path.stem]
    lm, tok = meta_latent_model(cfg, monkeypatch)
    base = lm.base
    arch = fixture_config(hub)
    emb, head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    rows = 128320  # 128,256 + <thinking> (+ Coconut's two markers) padded to a multiple of 64
    assert emb.shape == head.shape == (rows, arch.hidden_size) and base.config.vocab_size == rows
    assert lm.vocab_tokens == len(tok) < rows
    assert (emb is head) == tied == base.config.tie_word_embeddings
    assert emb.device.type == "meta" and emb.dtype == torch.bfloat16
    layers = base.model.layers
    assert len(layers) == arch.num_hidden_layers
    attn = layers[0].self_attn
    head_dim = arch.hidden_size // arch.num_attention_heads if arch.head_dim is None else arch.head_dim
    assert attn.q_proj.weight.shape == (arch.num_attention_heads * head_dim, arch.hidden_size)
    assert attn.k_proj.weight.shape == (arch.num_key_value_heads * head_dim, arch.hidden_size)
    assert layers[0].mlp.gate_proj.weight.shape == (arch.intermediate_size, arch.hidden_size)
    padding = (rows - LLAMA3_TOKENS) * arch.hidden_size * (1 if tied else 2)
    adapter = (2 * arch.hidden_size * 1024 + 1024 + 3 * arch.hidden_size) if method == "adapter" else 0
    own = sum(p.numel() for m in (lm.base, lm.adapter) if m is not None for p in m.parameters())
    assert own == n_params + padding + adapter
    if method == "softcot":  # the main model is frozen; only the projection trains
        assert not any(p.requires_grad for p in base.parameters())
        assert lm.projection.weight.shape == (arch.hidden_size, 2048)


def _stage3_batch(micro: int, length: int, latents: int, thinking_id: int):
    """A right-padded batch at the recipe's micro-batch: ragged rows, up to ``latents`` slots in a
    row (the stage-3 maximum: 8 sites, each doubled), consecutive pairs included."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, LLAMA3_TOKENS, (micro, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(micro):
        n = length - 7 * b
        mask[b, n:] = 0
        slots = torch.linspace(40, n - 8, latents // 2).long() if b % 2 == 0 else torch.tensor([60, 90])
        ids[b, slots] = thinking_id
        ids[b, slots + 1] = thinking_id
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :30] = -100
    return ids, mask, labels


@pytest.mark.parametrize("packed", ["auto", "off"])
@pytest.mark.parametrize("path", RECIPES, ids=recipe_id)
def test_stage3_forward_backward_at_full_shape_on_meta(path, packed, monkeypatch):
    cfg = load_config(path, ["engine.fused=off", f"engine.packed_passes={packed}"])
    # Every decoder layer has the same shapes: two of them check what all of them would, and meta
    # ops run through Python reference kernels (~1 ms each; all 32 layers of 8B take 45 s here).
    lm, _ = meta_latent_model(cfg, monkeypatch, num_hidden_layers=2)
    fusion = cfg.stages[2]
    lm.set_latent_mode("fusion", alpha=fusion.alpha, temperature=fusion.temperature, top_p=fusion.top_p)
    lm.train()
    latents = 2 * fusion.max_sites
    ids, mask, labels = _stage3_batch(cfg.train.micro_batch_size, 256, latents, lm.thinking_token_id)
    out = lm(ids, mask, labels, min_passes=1 + latents, return_logits=False)
    assert out.n_passes == 1 + latents and out.loss.shape == () and out.loss.device.type == "meta"
    out.loss.backward()
    head = lm.base.get_output_embeddings().weight
    assert head.grad is not None and head.grad.shape == head.shape and head.grad.dtype == torch.bfloat16
    assert all(p.grad is not None for p in lm.base.model.layers[-1].parameters())


def test_the_three_recipes_differ_only_where_the_paper_does():
    """One recipe at three scales: besides the model name, only epochs, checkpointing and (8B, for
    memory) the micro-batch under the same global batch differ."""
    cfgs = {p.stem: load_config(p) for p in RECIPES}
    ref = cfgs["llama-3.2-1b-instruct"]
    for name, c in cfgs.items():
        train = dataclasses.replace(c.train, micro_batch_size=8, grad_accum=2)
        assert (c.optim, train, c.data, c.eval, c.engine) == (
            ref.optim,
            ref.train,
            ref.data,
            ref.eval,
            ref.engine,
        )
        skip = {"name_or_path": None, "gradient_checkpointing": None}
        assert dataclasses.replace(c.model, **skip) == dataclasses.replace(ref.model, **skip), name
        assert [dataclasses.replace(s, epochs=1.0) for s in c.stages] == [
            dataclasses.replace(s, epochs=1.0) for s in ref.stages], name  # fmt: skip
