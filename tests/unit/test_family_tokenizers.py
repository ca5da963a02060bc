"""Instruct-model tokenizers: no BOS, many special tokens, chat templates (tests/fixtures/chat_tokenizers.py).

What a family's instruct format expects, checked on offline stand-ins of Qwen2.5, Llama 3 and Gemma
tokenizers: the prompt is the template's user turn plus generation prompt (no BOS of ltscale's own
when the template spells one, none at all for Qwen), the response ends the way the template ends
an assistant turn (so a training sequence is a prefix of the rendered conversation), prompts do
not depend on the day, and ``<thinking>`` lands after the family's special tokens with an
embedding row in a model that has more rows than tokens (Qwen) or exactly as many (Llama 3).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ltscale.data import Record, add_thinking_token, encode_example, load_tokenizer, prompt_ids
from ltscale.data.formatting import CHAT_TEMPLATE_KWARGS, assistant_text
from ltscale.model import LatentLM
from ltscale.model.builder import init_thinking_embedding
from ltscale.model.reference import reference_forward
from tests.fixtures.chat_tokenizers import KINDS, build

REC = Record("r1", "Tom has 5 apples. He buys 3 more. How many apples?", ("5+3=8",), "8")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {kind: load_tokenizer(str(build(kind, tmp_path_factory.mktemp(kind)))) for kind in KINDS}


@pytest.mark.parametrize("kind", list(KINDS))
def test_training_sequence_is_the_rendered_conversation(tokenizers, kind):
    tok = tokenizers[kind]
    end = KINDS[kind]["end_of_turn"]
    assert tok.eos_token == end, "load_tokenizer makes the template's end-of-turn token the EOS"
    enc = encode_example(tok, REC)
    assert enc.input_ids[-1] == tok.convert_tokens_to_ids(end) and enc.labels[-1] == enc.input_ids[-1]
    conversation = tok.apply_chat_template(
        [{"role": "user", "content": REC.question}, {"role": "assistant", "content": assistant_text(REC)}],
        tokenize=False,
        **CHAT_TEMPLATE_KWARGS,
    )
    text = tok.decode(enc.input_ids)
    assert conversation.startswith(text) and text.endswith(assistant_text(REC) + end)
    assert conversation[len(text) :].strip() == "", "only the template's trailing newline may follow"
    bos = KINDS[kind]["bos"]
    assert text.count(bos) == 1 if bos else tok.bos_token_id is None


def test_qwen_prompt_has_no_bos_and_the_default_system_turn(tokenizers):
    tok = tokenizers["qwen2.5-instruct"]
    ids = prompt_ids(tok, REC.question)
    assert tok.bos_token_id is None and ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{REC.question}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2  # special tokens stay single ids


def test_a_base_tokenizer_with_a_chat_template_ends_turns_as_the_template_does(tokenizers, tmp_path):
    """Qwen2.5 and Llama 3 base checkpoints ship the instruct template but another EOS."""
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(build("qwen2.5-base", tmp_path))
    assert raw.eos_token == "<|endoftext|>"
    assert tokenizers["qwen2.5-base"].eos_token == "<|im_end|>"
    assert tokenizers["qwen2.5-base"].pad_token == "<|endoftext|>"
    assert tokenizers["llama3-base"].eos_token == "<|eot_id|>"


def test_llama3_prompt_does_not_depend_on_the_day(tokenizers):
    tok = tokenizers["llama3-instruct"]
    ids = prompt_ids(tok, REC.question)
    assert "Today Date: 26 Jul 2024\n" in tok.decode(ids)
    # without the fixed date the template reads the clock (as Llama 3.2's does)
    rendered = tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False)
    assert "Today Date: 26 Jul 2024" not in rendered


@pytest.mark.parametrize(
    ("kind", "model_type"), [("qwen2.5-instruct", "qwen2"), ("llama3-instruct", "llama")]
)
def test_thinking_token_after_the_specials_with_an_embedding_row(tmp_path, kind, model_type):
    tok = load_tokenizer(str(build(kind, tmp_path)))
    n_before = len(tok)
    # Qwen's checkpoints have more embedding rows than tokens (151936 vs 151665); Llama 3's exactly as many
    rows = n_before + 37 if model_type == "qwen2" else n_before
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=rows,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).double()
    think = add_thinking_token(tok)
    assert think == n_before and len(tok) == n_before + 1
    assert tok.encode("a<thinking>b", add_special_tokens=False).count(think) == 1
    init_thinking_embedding(base, tok, think)
    emb = base.get_input_embeddings().weight
    # rows past the tokenizer are kept, a missing row is added (a resize may round up to a multiple)
    assert emb.shape[0] >= max(rows, len(tok))
    src = tok.encode("emm", add_special_tokens=False)
    src = src[0] if len(src) == 1 else tok.eos_token_id
    assert torch.equal(emb[think], emb[src])
    # a training sequence of this tokenizer through the rollout: fusion over every row, specials included
    enc = encode_example(tok, REC)
    ids = enc.input_ids[: enc.prompt_len + 3] + [think, think] + enc.input_ids[enc.prompt_len + 3 :]
    labels = [-100] * enc.prompt_len + ids[enc.prompt_len :]
    lm = LatentLM(base, think, mode="fusion")
    batch = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), torch.tensor([labels])
    out, ref = lm(*batch), reference_forward(lm, *batch)
    assert out.n_passes == 3 and out.logits.shape[-1] == emb.shape[0]
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=0)
