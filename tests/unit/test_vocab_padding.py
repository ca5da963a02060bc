"""Vocabulary padding (``model.pad_vocab_to_multiple_of``): padded rows change nothing a token sees.

``fit_vocab`` pads the embedding (and an untied head) to a multiple of 64 rows when
``<thinking>`` is added; ``LatentLM(vocab_tokens=...)`` masks the padded rows' logits. Proved here
in fp64 on CPU: a padded model whose padded rows hold large weights gives the same loss, gradients,
fusion input and greedy decode as the same weights without padding, and a padded model survives
save/reload with its mask. What CPU cannot show is the reason for padding (the head GEMM's speed on
tensor cores); that is a GPU measurement.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ltscale.model import LatentLM
from ltscale.model.builder import fit_vocab, init_thinking_embedding, padded_rows
from tests.helpers import make_tiny_llama, require_fused
from tests.unit.test_rollout import assert_grads_close, batch

TOKENS = 64  # tokens the tokenizer knows, <thinking> included; THINK = 63 as in test_rollout
THINK = 63


class _Tok:
    """The three things ``init_thinking_embedding`` asks of a tokenizer."""

    eos_token_id = 2

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [5]


def test_padded_rows_rounds_up():
    assert padded_rows(128257, 64) == 128320 and padded_rows(128320, 64) == 128320
    assert padded_rows(61, 1) == 61
    with pytest.raises(ValueError, match="pad_vocab_to_multiple_of"):
        padded_rows(10, 0)


@pytest.mark.parametrize("tie", [False, True])
def test_fit_vocab_zero_rows_old_rows_kept_rng_untouched(tie):
    base = make_tiny_llama(TOKENS - 1, tie=tie)  # the pretrained vocabulary, before <thinking>
    old_in = base.get_input_embeddings().weight.detach().clone()
    old_out = base.get_output_embeddings().weight.detach().clone()
    rng = torch.get_rng_state()
    assert fit_vocab(base, _Tok(TOKENS + 2), 48) == 96  # 66 tokens -> 96 rows
    init_thinking_embedding(base, _Tok(TOKENS + 2), THINK)
    assert torch.equal(torch.get_rng_state(), rng)  # no other random init of the run moves
    inp, out = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    assert inp.shape[0] == out.shape[0] == base.config.vocab_size == 96
    assert (out.data_ptr() == inp.data_ptr()) == tie
    assert torch.equal(inp[: TOKENS - 1], old_in) and torch.equal(out[: TOKENS - 1], old_out)
    assert torch.equal(inp[THINK], old_in[5]) and torch.equal(out[THINK], old_out[5])
    assert not inp[TOKENS : TOKENS + 2].eq(0).all()  # tokens added beyond <thinking>: transformers' init
    assert inp[TOKENS + 2 :].eq(0).all() and out[TOKENS + 2 :].eq(0).all()
    assert fit_vocab(base, TOKENS + 2, 48) == 96  # already padded: no-op
    assert fit_vocab(base, TOKENS + 2, 1) == 96  # extra rows are never dropped


def test_no_padding_when_multiple_is_one():
    base = make_tiny_llama(TOKENS - 1)
    fit_vocab(base, _Tok(TOKENS), 1)
    init_thinking_embedding(base, _Tok(TOKENS), THINK)
    assert base.get_input_embeddings().weight.shape[0] == TOKENS


def _pair(tie: bool, mode: str, impl: str = "torch"):
    """(unpadded, padded) LatentLMs with identical token rows; the padded one's 64 extra rows hold
    large values, so an unmasked row would dominate every softmax."""
    plain = make_tiny_llama(TOKENS, kv_heads=2, tie=tie, max_positions=2048)
    padded = copy.deepcopy(plain)
    fit_vocab(padded, TOKENS, 128)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for w in {
            id(p): p for p in (padded.get_input_embeddings().weight, padded.get_output_embeddings().weight)
        }.values():
            w[TOKENS:] = 50.0 * torch.randn(w.shape[0] - TOKENS, w.shape[1], generator=gen, dtype=w.dtype)
    kw = {"mode": mode, "alpha": 0.6, "top_p": 0.9, "fusion_impl": impl}
    return LatentLM(plain, THINK, **kw), LatentLM(padded, THINK, vocab_tokens=TOKENS, **kw)


def _grads(lm: LatentLM) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in lm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("mode", "impl"), [("cot", "torch"), ("hidden", "torch"), ("fusion", "torch"), ("fusion", "fused")]
)  # only fusion dispatches to the compiled op
@pytest.mark.parametrize("tie", [False, True])
def test_padded_model_trains_as_unpadded(mode, tie, impl):
    if impl == "fused":
        require_fused()
    plain, padded = _pair(tie, mode, impl)
    ids, mask, labels = batch("mixed" if mode != "cot" else "none")
    out_p = plain(ids, mask, labels)
    out_q = padded(ids, mask, labels)
    out_p.loss.backward()
    out_q.loss.backward()
    torch.testing.assert_close(out_q.loss, out_p.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(out_q.logits[..., :TOKENS], out_p.logits, rtol=1e-12, atol=1e-12)
    g_plain, g_pad = _grads(plain), _grads(padded)
    for name in [n for n in g_pad if g_pad[n].shape != g_plain[n].shape]:  # the embedding / head rows
        assert g_pad[name][TOKENS:].eq(0).all(), f"{name}: padded rows got a gradient"
        g_pad[name] = g_pad[name][:TOKENS]
    assert_grads_close(g_pad, g_plain, rtol=1e-10)


def test_padded_model_decodes_as_unpadded():
    plain, padded = _pair(False, "fusion")
    prompts = [[1, 7, 9, 4], [3, 3, 8]]
    a = plain.eval().generate_many(prompts, 12, slots=2)
    b = padded.eval().generate_many(prompts, 12, slots=2)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.num_latent, b.num_latent)
    assert int(b.sequences.max()) < TOKENS
    unmasked = LatentLM(padded.base, THINK, mode="fusion").eval()  # what the mask prevents
    assert int(unmasked.generate_many(prompts, 12, slots=2).sequences.max()) >= TOKENS


def test_run_setup_pads_and_the_export_reloads_with_its_mask(tmp_path):
    """The product path: tiny default -> padded rows, masked; save/reload keeps both."""
    from ltscale.model.io import load_latent_model, save_latent_model
    from ltscale.run_config import load_config
    from ltscale.run_setup import build_latent_model, prepare_data

    cfg = load_config(None, [f"run_dir={tmp_path}", "data.synthetic.n_train=64", "data.synthetic.n_test=4",
                             "model.tokenizer_vocab_size=120"])  # fmt: skip
    data = prepare_data(cfg, tmp_path)
    lm = build_latent_model(cfg, data)
    n = len(data.tokenizer)
    rows = lm.base.get_input_embeddings().weight.shape[0]
    assert lm.vocab_tokens == n and rows % 64 == 0 and n < rows < n + 64
    assert lm.base.config.vocab_size == rows
    lm.set_latent_mode("fusion")
    save_latent_model(tmp_path / "hf", config=lm.base.config, latent_state=lm.state_dict(),
                      tokenizer=data.tokenizer, latent_config=lm.latent_config())  # fmt: skip
    back, tok = load_latent_model(tmp_path / "hf")
    assert back.vocab_tokens == len(tok) == n and back.base.get_input_embeddings().weight.shape[0] == rows
    prompts = [data.train[i].input_ids[: data.train[i].prompt_len] for i in range(3)]
    a = lm.eval().generate_many(prompts, 8, slots=3)
    b = back.generate_many(prompts, 8, slots=3)
    assert torch.equal(a.sequences, b.sequences) and int(b.sequences.max()) < n
