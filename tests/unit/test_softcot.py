"""SoftCoT: only the projection trains when the base is frozen; cached assistant thoughts equal
recomputed ones (and survive the cache file); batched decoding equals per-sample; config errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from ltscale.config import ConfigError
from ltscale.methods.softcot import SoftCoTLM, assistant_thoughts
from ltscale.model.generation import left_pad
from ltscale.run_config import load_config
from tests.helpers import make_tiny_llama

VOCAB, THINK, EOS, N = 64, 63, 2, 3


def llama(hidden: int, seed: int) -> LlamaForCausalLM:
    # global seed: the SoftCoT projection built next draws its init from the state this leaves
    return make_tiny_llama(
        VOCAB, hidden, kv_heads=2, seed=seed, max_positions=2048, isolated_rng=False, record_dtype=False
    )


def softcot(train_base: bool = False) -> SoftCoTLM:
    lm = SoftCoTLM(
        llama(32, 0), THINK, assistant=llama(24, 1), placeholder_id=EOS, n_thoughts=N, train_base=train_base
    )
    return lm.double()


PROMPTS = [(1, 5, 9, 13), (1, 8), (1, 30, 31, 32, 33, 34)]


def batch():
    rows = [list(p) + [THINK] * N + [10 + i, 11, 12, EOS] for i, p in enumerate(PROMPTS)]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (r, p) in enumerate(zip(rows, PROMPTS)):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
        labels[b, len(p) + N : len(r)] = torch.tensor(r[len(p) + N :])
    return ids, mask, labels


def test_projection_is_the_only_trainable_module_when_base_frozen():
    lm = softcot()
    ids, mask, labels = batch()
    lm(ids, attention_mask=mask, labels=labels).loss.backward()
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable == {"projection.weight", "projection.bias"}
    for n, p in lm.named_parameters():
        if n.startswith("projection."):
            assert p.grad is not None and p.grad.abs().max() > 0, n
        else:
            assert p.grad is None, n
    assert all(p.grad is None for p in lm.assistant.parameters())


def test_train_base_option_trains_the_main_model_too():
    lm = softcot(train_base=True)
    ids, mask, labels = batch()
    lm(ids, attention_mask=mask, labels=labels).loss.backward()
    assert lm.base.get_input_embeddings().weight.grad is not None
    assert all(p.grad is None for p in lm.assistant.parameters())


def test_soft_thoughts_replace_exactly_the_slots():
    lm = softcot()
    ids, mask, _ = batch()
    lm._slots = lm.projection(lm.thoughts(ids, mask).double())
    got = lm.embed(ids)
    plain = lm.base.get_input_embeddings()(ids)
    slot = ids == THINK
    torch.testing.assert_close(got[~slot], plain[~slot])
    torch.testing.assert_close(got[slot].reshape(len(PROMPTS), N, -1), lm._slots)


def test_cached_thoughts_equal_recomputed_and_survive_the_cache_file(tmp_path):
    lm = softcot()
    path = tmp_path / "thoughts.pt"
    lm.fill_cache(PROMPTS, path)  # batched, left-padded
    decoder = lm.assistant.get_decoder()
    for p in PROMPTS:  # one unpadded sequence at a time
        ids = torch.tensor([list(p) + [EOS] * N])
        want = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, -N:].float()
        torch.testing.assert_close(lm.cache[p], want, rtol=1e-5, atol=1e-6)
    other = softcot()
    other.assistant.requires_grad_(False)
    for prm in other.assistant.parameters():  # a different assistant: only the file can give equal states
        prm.data.zero_()
    other.fill_cache(PROMPTS, path)
    for p in PROMPTS:
        assert torch.equal(other.cache[p], lm.cache[p])
    assert assistant_thoughts(lm.assistant, PROMPTS, N, EOS, batch_size=1).shape == (3, N, 24)


def test_batched_generation_equals_per_sample():
    lm = softcot().eval()
    rows = [list(p) + [THINK] * N for p in PROMPTS]
    ids, mask = left_pad(rows)
    out = lm.generate(ids, mask, 8, eos_token_id=EOS)
    for b, r in enumerate(rows):
        one = lm.generate(torch.tensor([r]), None, 8, eos_token_id=EOS)
        assert torch.equal(out.sequences[b], one.sequences[0])


def test_softcot_config_errors():
    with pytest.raises(ConfigError, match=r"^softcot\.assistant: method 'softcot' needs an assistant"):
        load_config(None, ["method=softcot"])
    with pytest.raises(ConfigError, match=r"^softcot\.n_thoughts"):
        load_config(
            None, ["method=softcot", "softcot.assistant=configs/tiny-assistant.yaml", "softcot.n_thoughts=0"]
        )
    cfg = load_config(None, ["method=softcot", "softcot.assistant=configs/tiny-assistant.yaml"])
    assert {st.mode for st in cfg.stages} == {"cot"}


def test_continuous_batching_equals_per_sample():
    """Prompts prefilled in different groups (two slots for three prompts) get their own thoughts."""
    from ltscale.methods.softcot import SoftCoTRule
    from ltscale.model.generation import generate_many

    lm = softcot().eval()
    rows = [list(p) + [THINK] * N for p in PROMPTS]
    rule = SoftCoTRule(prompt_latents=N)
    many = generate_many(lm, rows, 8, slots=2, eos_token_id=EOS, rule=rule)
    for b, r in enumerate(rows):
        one = lm.generate(torch.tensor([r]), None, 8, eos_token_id=EOS)
        assert torch.equal(many.sequences[b], one.sequences[0]), b
        assert int(many.num_latent[b]) == int(one.num_latent[0]) == N
    plain = generate_many(lm, rows, 8, slots=2, eos_token_id=EOS, without_thinking=True)
    assert not torch.equal(plain.sequences, many.sequences), "the thoughts must change the answers"
