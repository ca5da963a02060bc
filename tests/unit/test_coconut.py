"""Coconut in the shared engine: the published data layout on hand-built examples, the KV-cached
rollout against the naive per-slot recompute (fp64, values and grads), forced-latent decoding
against the reference decoder, and its config errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ltscale.config import ConfigError
from ltscale.data import collate
from ltscale.methods import Checkpoint
from ltscale.methods.coconut import Coconut, build_example, stage_layout
from ltscale.model import LatentLM
from ltscale.model.generation import left_pad
from ltscale.model.reference import reference_forward, reference_generate
from ltscale.run_config import load_config
from tests.helpers import tiny_latent_lm

VOCAB, BOT, EOT, THINK, EOS = 64, 60, 61, 63, 2


def char_tokenize(texts: list[str]) -> list[list[int]]:
    """A stand-in tokenizer: one id per character (ids 6..59), enough to check the layout."""
    return [[6 + ord(ch) % 54 for ch in t] for t in texts]


def example(steps, stage, *, prompt=(1, 7, 8, 9), c=2, max_stage=3, pad=True):
    return build_example(
        "x",
        steps,
        "42",
        list(prompt),
        char_tokenize,
        stage=stage,
        c_thought=c,
        max_latent_stage=max_stage,
        pad_latent_to_max=pad,
        bot_id=BOT,
        eot_id=EOT,
        latent_id=THINK,
        eos_id=EOS,
    )


STEPS = ["1+2=3", "3*4=12", "12-5=7"]


@pytest.mark.parametrize("stage, dropped, n_latent", [(0, 0, 0), (1, 1, 2), (2, 2, 4), (3, 3, 6), (4, 3, 6)])
def test_layout_markers_latents_and_masked_labels(stage, dropped, n_latent):
    e = example(STEPS, stage)
    prompt = [1, 7, 8, 9]
    head = prompt + [BOT] + [THINK] * n_latent + [EOT]
    kept = [f"## Step {i}: {s}\n" for i, s in enumerate(STEPS, 1)][dropped:] + [
        "The final answer is:\n### 42"
    ]
    response = [t for ids in char_tokenize(kept) for t in ids] + [EOS]
    assert e.input_ids == head + response
    assert e.labels == [-100] * len(head) + response  # question, markers and latents carry no loss
    assert e.prompt_len == len(prompt)


def test_stage_is_not_capped_by_the_samples_own_steps():
    # the original: a 2-step sample at stage 3 gets 3*c latents and no language steps
    e = example(STEPS[:2], 3)
    answer_only = [t for ids in char_tokenize(["The final answer is:\n### 42"]) for t in ids] + [EOS]
    assert e.input_ids.count(THINK) == 6 and e.input_ids[e.input_ids.index(EOT) + 1 :] == answer_only
    assert stage_layout(3, 2, c_thought=2, max_latent_stage=3) == (2, 6)
    # past the last latent stage without padding: latents follow the sample's step count
    assert stage_layout(4, 2, c_thought=2, max_latent_stage=3, pad_latent_to_max=False) == (2, 4)


def tiny_lm(mode: str = "hidden") -> LatentLM:
    return tiny_latent_lm(THINK, mode, VOCAB)


def coconut_batch(stage: int):
    steps = [STEPS, STEPS[:2], STEPS + ["7+1=8"], STEPS[:1]]
    prompts = [(1, 7, 8), (1, 9, 10, 11, 12, 13), (1, 14), (1, 15, 16, 17)]
    exs = [example(s, stage, prompt=p, max_stage=2) for s, p in zip(steps, prompts)]
    return collate(exs, pad_id=0)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_coconut_rollout_matches_naive_reference(stage):
    batch = coconut_batch(stage)
    lm = tiny_lm()
    args = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    fast = lm(**args)
    assert fast.n_passes == 1 + 2 * min(stage, 2)  # one pass per latent plus one: no per-position loop
    fast.loss.backward()
    g_fast = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    ref = reference_forward(lm, **args)
    ref.loss.backward()
    torch.testing.assert_close(fast.loss, ref.loss, rtol=1e-10, atol=1e-12)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(fast.logits[valid], ref.logits[valid], rtol=1e-8, atol=1e-9)
    for n, p in lm.named_parameters():
        err = (g_fast[n] - p.grad).abs().max() / (p.grad.abs().max() + 1e-30)
        assert err < 1e-6, n


def coconut_meta(n_latent: int = 4) -> dict:
    return {"mode": "hidden", "coconut": {"stage": 2, "n_latent": n_latent, "bot_id": BOT, "eot_id": EOT}}


def test_forced_latents_at_inference_match_reference_decoder():
    lm = tiny_lm().eval()
    decoding = Coconut().decoding(Checkpoint(lm=lm, tokenizer=None, meta=coconut_meta(4)))
    assert decoding.prompt_suffix == [BOT] and decoding.without_thinking
    prompts = [[1, 7, 8, 9, BOT], [1, 10, BOT]]
    ids, mask = left_pad(prompts)
    out = lm.generate(ids, mask, 12, eos_token_id=EOS, rule=decoding.rule)
    assert out.num_latent.tolist() == [4, 4]
    assert (out.sequences[:, :5] == torch.tensor([THINK] * 4 + [EOT])).all()
    assert not (out.sequences[:, 5:] == THINK).any()  # free decoding never emits a latent
    forced = decoding.rule.forced
    ref = reference_generate(lm, ids, mask, 12, eos_token_id=EOS, without_thinking=True, forced=forced)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.num_latent, ref.num_latent)


def test_resolve_sets_modes_and_bad_input_fails_before_training():
    cfg = load_config(None, ["method=coconut", "coconut.max_latent_stage=2"])
    assert [st.mode for st in cfg.stages] == ["cot", "hidden", "hidden"]
    assert all(st.max_sites == 0 for st in cfg.stages)
    train = SimpleNamespace(n_steps=np.array([1, 0]))  # what check_data reads of the training set
    with pytest.raises(ConfigError, match=r"coconut\.max_latent_stage.*1 reasoning step"):
        Coconut().check_data(cfg, train)
    with pytest.raises(ConfigError, match=r"coconut\.c_thought"):
        load_config(None, ["method=coconut", "coconut.c_thought=0"])
    with pytest.raises(ConfigError, match=r"^method: 'cocnut' is not one of"):
        load_config(None, ["method=cocnut"])


def test_checkpoint_meta_selects_coconut_decoding_also_for_an_export(tmp_path):
    import json

    from ltscale import rundir
    from ltscale.inference import inference_for

    cfg = load_config(None, ["method=coconut", "coconut.max_latent_stage=2"])
    meta = Coconut().checkpoint_meta(cfg, 3, {"<|start-latent|>": BOT, "<|end-latent|>": EOT})
    assert meta["coconut"]["n_latent"] == 4  # stage 2 of max 2, c=2
    stage_hf = tmp_path / "run" / "stage3" / "hf"
    stage_hf.mkdir(parents=True)
    (stage_hf / "ltscale_latent.json").write_text(json.dumps({"mode": "hidden", **meta}))
    export = tmp_path / "export"  # what `ltscale export` writes: no method keys, a source entry
    export.mkdir()
    source = {"checkpoint": str(tmp_path / "run" / "stage3" / "ckpt" / "final")}
    (export / "ltscale_latent.json").write_text(json.dumps({"mode": "hidden", "source": source}))
    for hf in (stage_hf, export):
        how = inference_for(tiny_lm(), None, meta=rundir.inference_meta(hf), path=hf)
        assert how.method == "coconut" and how.without_thinking
        assert how.rule.forced.tolist() == [THINK] * 4 + [EOT]
        assert how.prompt_suffix == [BOT]
