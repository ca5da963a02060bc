"""Every model family ltscale claims to support (ltscale/model/families.py), on a random tiny config.

The grid, per family and attention kernel (Gemma 2: eager only):

* values and gradients of the rollout (hidden / fusion / pause, packed and padded passes) against
  the naive one-sample-at-a-time reference (``reference.py``), float64; Qwen3-MoE also in float32
  with the default grouped expert GEMM (it takes no float64; see ``MOE_FP32``);
* a single pass (``cot``) against the model's own ``forward``: logits and loss. The reference
  shares ``LatentLM``'s embedding and head calls, so only this catches a family whose ``forward``
  does something around them (Granite's ``logits_scaling``);
* the fusion's expected embedding against the embedding module's own output (Gemma's sqrt(d));
* batched KV-cached decoding against one-at-a-time full-recompute decoding.

Tolerances (float64): loss rtol 1e-12 with sdpa, 1e-8 with eager (transformers' eager softmax runs
in float32); gradients per parameter ``max|g - g_ref| <= 2e-6 * max|g_ref|``, because every family's
RMSNorm/LayerNorm computes in float32 internally, so sums taken in a different order differ at 1e-7.

CPU only: what differs on a GPU (bf16 kernels, the CUDA fusion kernel) is not proven here; the
families' code paths (masks, caches, positions, head transforms) are the same on every device.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ltscale.model import LatentLM
from ltscale.model.families import FAMILIES, UnsupportedModelError, check_config, embedding_scale
from ltscale.model.packed import packing_supported
from ltscale.model.reference import reference_forward, reference_generate
from tests.unit.test_rollout import THINK, VOCAB, assert_grads_close, batch, grads, run_both

EOS = 5
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Per family: what makes its tiny config exercise the family's own code (head_dim where it is not
# hidden/heads, Granite's multipliers, soft-caps small enough to bite, a Gemma 3 window that is
# installed but longer than any test row; the window itself is tested below).
CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": {},  # the default config has a 4096-token sliding window: the guard is installed
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "qwen3_moe": {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    "phi3": {},
    "olmo2": {},
    "granite": {
        "embedding_multiplier": 3.0,
        "logits_scaling": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.3,
    },
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 3.0, "attn_logit_softcapping": 2.0},
    "gemma3_text": {
        "head_dim": 8,
        "sliding_window": 64,
        "final_logit_softcapping": 3.0,
        "layer_types": ["sliding_attention", "full_attention"],
    },
}
# The grouped expert GEMM takes no float64: float32, and float64 through the experts' eager loop.
MOE_FP32 = "qwen3_moe"
MOE_FP64 = "qwen3_moe/eager-experts"
CASES = [(f, k) for f in CONFIGS for k in FAMILIES[f].kernels] + [(MOE_FP64, k) for k in ("sdpa", "eager")]


def fresh_model(family: str, kernel: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model of ``family`` (``CONFIGS``, with ``overrides``), float64 unless ``MOE_FP32``."""
    model_type = family.split("/")[0]
    cfg = AutoConfig.for_model(model_type, **{**_COMMON, **CONFIGS[model_type], **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=kernel)
    if family == MOE_FP64:
        model.config._experts_implementation = "eager"
    return model.to(torch.float32 if family == MOE_FP32 else torch.float64).train()


@functools.cache
def base_model(family: str, kernel: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """``fresh_model``, shared by the tests that do not change its weights."""
    return fresh_model(family, kernel, seed, **overrides)


def tolerances(family: str, kernel: str) -> dict:
    if family == MOE_FP32:  # measured: loss 1e-7, logits 3e-6, grads 6e-7 relative; 10-30x margin
        return dict(loss=1e-5, logits=1e-4, grads=2e-5)
    return dict(
        loss=1e-12 if kernel == "sdpa" else 1e-8, logits=1e-10 if kernel == "sdpa" else 1e-7, grads=2e-6
    )


def test_the_grid_covers_every_supported_family():
    assert set(CONFIGS) == set(FAMILIES), (
        "a family claimed in families.py must be in this grid (and vice versa)"
    )


@pytest.mark.parametrize("packed", ["auto", "off"])
@pytest.mark.parametrize("mode", ["hidden", "fusion", "pause"])
@pytest.mark.parametrize(("family", "kernel"), CASES)
def test_rollout_matches_reference(family, kernel, mode, packed):
    base = base_model(family, kernel)
    lm = LatentLM(base, THINK, mode=mode, alpha=0.6, top_p=0.9, packed_passes=packed)
    # padding side alternates with the pass layout; test_rollout.py covers both sides for each on Llama
    ids, mask, labels = batch("mixed", "left" if packed == "auto" else "right")
    fast, ref, g_fast, g_ref = run_both(lm, ids, mask, labels)
    tol = tolerances(family, kernel)
    torch.testing.assert_close(fast.loss, ref.loss, rtol=tol["loss"], atol=0)
    valid = mask.bool()
    torch.testing.assert_close(fast.logits[valid], ref.logits[valid], rtol=tol["logits"], atol=tol["logits"])
    assert_grads_close(g_fast, g_ref, rtol=tol["grads"])
    assert fast.n_passes == (5 if mode != "pause" else 1)
    if family == "gemma2":
        assert not packing_supported(base.config), "attention soft-capping must keep the padded passes"


@pytest.mark.parametrize(("family", "kernel"), CASES)
def test_single_pass_equals_the_models_own_forward(family, kernel):
    base = base_model(family, kernel)
    lm = LatentLM(base, THINK, mode="cot")
    ids, mask, labels = batch("none", "right")  # HF's forward derives positions from arange: right padding
    with torch.no_grad():
        ours = lm(ids, mask, labels)
        theirs = base(input_ids=ids, attention_mask=mask, labels=labels)
    valid = mask.bool()
    tol = tolerances(family, kernel)
    torch.testing.assert_close(
        ours.logits[valid], theirs.logits[valid], rtol=tol["logits"], atol=tol["logits"]
    )
    # transformers takes the loss in float32 (ltscale keeps float64): compare at float32 precision
    torch.testing.assert_close(ours.loss.float(), theirs.loss.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", ["reference", "torch", "auto"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_expected_embedding_is_the_embedding_modules_output(family, impl):
    """``e = a*h + (1-a) * sum_w P(w) embed(w)`` with ``embed`` the model's own embedding module."""
    base = base_model(family, FAMILIES[family].kernels[0])
    lm = LatentLM(base, THINK, mode="fusion", alpha=0.6, top_p=1.0, fusion_impl=impl)
    gen = torch.Generator().manual_seed(3)
    dtype = base.get_input_embeddings().weight.dtype
    hidden = torch.randn(3, 32, generator=gen, dtype=dtype)
    logits = 4 * torch.randn(3, VOCAB, generator=gen, dtype=dtype)
    with torch.no_grad():
        table = lm.embed(torch.arange(VOCAB))  # (V, d): every row as the model embeds it
        masked = logits.index_fill(1, torch.tensor([THINK]), float("-inf"))  # <thinking> is never predicted
        probs = torch.softmax(masked, dim=-1)
        want = 0.6 * hidden + 0.4 * probs @ table
        got = lm.latent_input(hidden, logits)
        torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
        # one kept token and alpha = 0: exactly the embedding module's output for that token
        lm.set_latent_mode("fusion", alpha=0.0, top_p=1e-6)
        assert torch.equal(lm.latent_input(hidden, logits), lm.embed(masked.argmax(-1)))
    scale = embedding_scale(base.get_input_embeddings())
    assert scale == (
        1.0 if not family.startswith("gemma") else float(torch.tensor(32**0.5, dtype=torch.float32))
    )


@pytest.mark.parametrize("mode", ["hidden", "fusion"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_batched_decoding_equals_one_at_a_time(family, mode):
    # greedy decoding compares argmaxes: float64 for MoE too, so rounding cannot flip a near-tie
    family = MOE_FP64 if family == MOE_FP32 else family
    base = fresh_model(family, FAMILIES[family.split("/")[0]].kernels[0], seed=7)  # its head is biased below
    with torch.no_grad():
        head = base.get_output_embeddings().weight
        head[THINK] += 3 * head.std()  # make <thinking> a frequent argmax
        head[EOS] += 1.5 * head.std()
    lm = LatentLM(base, THINK, mode=mode).eval()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(6, 60, (n,), generator=gen).tolist() for n in (7, 4, 6, 2)]
    # two forced latent steps first (tied-embedding Gemmas rarely pick <thinking> on their own), then free
    forced = torch.tensor([THINK, THINK])
    fast = lm.generate_many(prompts, 12, slots=3, eos_token_id=EOS, pad_token_id=0, forced=forced)
    for b, p in enumerate(prompts):
        ref = reference_generate(
            lm, torch.tensor([p]), None, 12, eos_token_id=EOS, pad_token_id=0, forced=forced
        )
        n = int(ref.lengths[0])
        assert int(fast.lengths[b]) == n
        assert torch.equal(fast.sequences[b, :n], ref.sequences[0, :n]), f"prompt {b}"
        assert int(fast.num_latent[b]) == int(ref.num_latent[0])
    assert torch.all(fast.num_latent >= 2)


# ----------------------------------------------------------------------------- refusals and limits
def test_an_unchecked_family_is_refused_at_build_naming_it():
    cfg = AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4)
    with pytest.raises(
        UnsupportedModelError, match=r"model family 'gpt2' \(GPT2Config\).*Supported model_type"
    ):
        LatentLM(AutoModelForCausalLM.from_config(cfg), THINK, mode="hidden")
    multimodal = AutoConfig.for_model("gemma3")
    with pytest.raises(UnsupportedModelError, match="multimodal Gemma 3.*gemma3_text"):
        check_config(multimodal)


def test_gemma2_with_sdpa_is_refused_naming_the_config_key():
    cfg = AutoConfig.for_model("gemma2", **{**_COMMON, **CONFIGS["gemma2"]})
    with pytest.raises(
        UnsupportedModelError, match=r"model.attn_implementation: 'sdpa'.*Gemma 2.*soft-capping.*eager"
    ):
        check_config(cfg, "sdpa")
    assert check_config(cfg, "eager").name == "Gemma 2"


def test_build_base_model_refuses_before_loading_weights(tmp_path):
    from ltscale.model.builder import build_base_model

    gemma2 = base_model("gemma2", "eager")
    gemma2.save_pretrained(tmp_path / "g2")
    with pytest.raises(UnsupportedModelError, match="model.attn_implementation: 'sdpa'"):
        build_base_model(
            name_or_path=str(tmp_path / "g2"),
            init={},
            vocab_size=VOCAB,
            dtype=torch.float32,
            attn_implementation="sdpa",
        )
    built = build_base_model(
        name_or_path=str(tmp_path / "g2"),
        init={},
        vocab_size=VOCAB,
        dtype=torch.float64,
        attn_implementation="eager",
    )
    assert built.config._attn_implementation == "eager"
    gpt2 = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4)
    )
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        build_base_model(name_or_path=str(tmp_path / "gpt2"), init={}, vocab_size=VOCAB, dtype=torch.float32)


def test_sliding_window_is_exact_up_to_the_window_and_refused_beyond():
    """Rows of 16 tokens: a window of 16 changes nothing (exact against the reference, which runs
    transformers' own windowed masks); a window of 15 would, so ltscale refuses the call."""
    ids, mask, labels = batch("mixed", "left")
    exact = LatentLM(base_model("gemma3_text", "sdpa", sliding_window=16), THINK, mode="fusion")
    out = exact(ids, mask, labels)
    ref = reference_forward(exact, ids, mask, labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=0)
    # the last position's logits are the ones a window of 15 would change (0.04 without the guard)
    torch.testing.assert_close(out.logits[mask.bool()], ref.logits[mask.bool()], rtol=1e-10, atol=1e-12)
    short = LatentLM(base_model("gemma3_text", "sdpa", sliding_window=15), THINK, mode="fusion")
    with pytest.raises(ValueError, match=r"Gemma 3 \(text\).*16 key slots.*window 15"):
        short(ids, mask, labels)  # packed: key slot j of a row is its token at true position j
    exact.packed_passes = "off"  # padded passes hold every pass's padded width in the cache
    with pytest.raises(ValueError, match="window 16"):
        exact(ids, mask, labels)
    with pytest.raises(ValueError, match="window 15"):
        short.generate_many([list(range(6, 20))], 4, slots=1)


@pytest.mark.parametrize("original", [16, 15])
def test_position_dependent_rope_is_exact_up_to_its_limit_and_refused_beyond(original):
    """Phi-3 128k's LongRoPE switches frequencies once a call's longest row passes the original
    context: rows of 16 tokens are exact at 16, refused at 15."""
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "original_max_position_embeddings": original,
        "short_factor": [1.0, 1.0, 1.0, 1.0],
        "long_factor": [1.0, 2.0, 4.0, 8.0],
    }
    lm = LatentLM(
        fresh_model("phi3", "sdpa", original_max_position_embeddings=original, rope_parameters=rope),
        THINK,
        mode="hidden",
    )
    ids, mask, labels = batch("mixed", "left")
    if original == 16:
        torch.testing.assert_close(
            lm(ids, mask, labels).loss, reference_forward(lm, ids, mask, labels).loss, rtol=1e-12, atol=0
        )
    else:
        with pytest.raises(ValueError, match=r"Phi-3.*rotary frequencies.*up to 15"):
            lm(ids, mask, labels)


def test_the_qwen_instruct_example_config_loads_and_names_a_checked_family(repo_root):
    from ltscale.run_config import load_config

    cfg = load_config(repo_root / "configs" / "qwen2.5-0.5b-instruct-gsm8k.yaml")
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.model.use_chat_template
    assert (
        check_config(AutoConfig.for_model("qwen2"), cfg.model.attn_implementation).name == "Qwen2 / Qwen2.5"
    )


# ----------------------------------------------------------------------------- mixture of experts: router aux loss
AUX_COEF = 0.5  # large, so that a dropped or repeated aux loss shows in the total


def moe_with_aux() -> torch.nn.Module:
    return fresh_model(MOE_FP64, "sdpa", output_router_logits=True, router_aux_loss_coef=AUX_COEF)


@pytest.mark.parametrize("packed", ["auto", "off"])
def test_router_aux_loss_equals_the_models_own_forward(packed):
    """No latents, one pass: the loss the model's own ``forward`` computes (cross-entropy +
    coef * load balancing over the real tokens of the padded batch)."""
    base = moe_with_aux()
    lm = LatentLM(base, THINK, mode="cot", packed_passes=packed)
    ids, mask, labels = batch("none", "right")
    with torch.no_grad():
        ours = lm(ids, mask, labels)
        theirs = base(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(
        ours.aux_loss, AUX_COEF * theirs.aux_loss.to(ours.aux_loss.dtype), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(ours.loss.float(), theirs.loss.float(), rtol=1e-6, atol=0)  # HF: float32 loss
    assert ours.aux_loss > 1e-3 * ours.loss, "the aux term must be visible in the total"


def reference_aux(lm: LatentLM, ids, mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive reference's loss and the aux loss of its last full forward of each sample: every
    real token routed exactly once, with its latent inputs in place."""
    aux = lm.family.router_aux
    starts: list[int] = []
    hook = lm.decoder().register_forward_pre_hook(lambda m, a: starts.append(len(aux.calls)))
    aux.begin()
    try:
        ref = reference_forward(lm, ids, mask, labels)
    finally:
        calls = aux.end()
        hook.remove()
    n_layers = len(aux.routers)
    latents = ((ids == THINK) & mask.bool()).sum(1).tolist() if lm.uses_rollout else [0] * len(ids)
    last = [sum(n + 1 for n in latents[: b + 1]) - 1 for b in range(len(ids))]  # each sample's final call
    final = [calls[starts[c] : starts[c] + n_layers] for c in last]
    per_layer = tuple(torch.cat([f[layer] for f in final]) for layer in range(n_layers))
    return ref.loss, aux.coef * aux.loss_fn(per_layer, aux.num_experts, aux.top_k)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("packed", ["auto", "off"])
@pytest.mark.parametrize("mode", ["hidden", "fusion"])
def test_router_aux_loss_is_counted_once_over_all_passes(mode, packed, checkpointing):
    """Five passes plus two empty lockstep ones: one aux loss over every real token, equal to the
    reference's (values and gradients), neither once per pass nor dropped."""
    lm = LatentLM(
        moe_with_aux(), THINK, mode=mode, packed_passes=packed, gradient_checkpointing=checkpointing
    )
    ids, mask, labels = batch("mixed", "left" if packed == "auto" else "right")
    lm.zero_grad()
    fast = lm(ids, mask, labels, min_passes=7)
    fast.loss.backward()
    g_fast = grads(lm)
    lm.zero_grad()
    ce_ref, aux_ref = reference_aux(lm, ids, mask, labels)
    (ce_ref + aux_ref).backward()
    g_ref = grads(lm)
    assert fast.n_passes == 7
    torch.testing.assert_close(fast.aux_loss, aux_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(fast.loss, ce_ref + aux_ref, rtol=1e-12, atol=0)
    assert_grads_close(g_fast, g_ref, rtol=2e-6)
    assert any("gate" in n and g.abs().max() > 0 for n, g in g_fast.items()), (
        "the routers learn from the aux loss"
    )


def test_without_output_router_logits_there_is_no_aux_loss_as_in_the_models_forward():
    base = fresh_model(MOE_FP64, "sdpa")
    assert base.config.output_router_logits is False  # the Qwen3-MoE checkpoints' setting
    out = LatentLM(base, THINK, mode="hidden")(*batch("mixed"))
    assert out.aux_loss is None
