"""Sentencepiece tokenizer: round trip, sentencepiece parity, reload equality, determinism, <thinking>."""

from __future__ import annotations

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from ltscale.data import (
    DataError,
    add_thinking_token,
    assistant_text,
    generate_problems,
    load_tokenizer,
    train_sentencepiece,
)
from ltscale.data.formatting import plain_prompt_text
from ltscale.data.tokenizer import SPM_MODEL_FILE


def _texts(n: int, seed: int = 0) -> list[str]:
    return [plain_prompt_text(r.question) + assistant_text(r) for r in generate_problems(n, seed=seed)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_sentencepiece(_texts(400), out, vocab_size=256, seed=0), out


ODD = [
    "Question: Tom has 12 apples.\nAnswer:\n## Step 1: 12+3=15\nThe final answer is:\n### 15",
    "\n\nleading newlines and trailing  spaces  \n",
    "  two  spaces\tand a tab, 0123456789 digits, ### hashes #",
    "unseen chars: é € 😀 Ω and CAPS",
]


def test_special_ids_and_layout(trained):
    tok, out = trained
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.convert_tokens_to_ids(["\n", "#"]) == [4, 5]
    assert len(tok) <= 256 + 256 and tok.chat_template is None
    assert (out / SPM_MODEL_FILE).is_file() and (out / "tokenizer.json").is_file()
    assert tok("a").input_ids[0] == tok.bos_token_id and tok.eos_token_id not in tok("a").input_ids


@pytest.mark.parametrize("text", _texts(20, seed=9) + ODD)
def test_round_trip(trained, text):
    tok, _ = trained
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids  # byte fallback covers everything


def test_digits_are_single_tokens(trained):
    tok, _ = trained
    pieces = tok.convert_ids_to_tokens(tok.encode("x 1234567890 y", add_special_tokens=False))
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("1234567890")


def test_matches_sentencepiece(trained):
    tok, out = trained
    sp = spm.SentencePieceProcessor(model_file=str(out / SPM_MODEL_FILE))
    for text in _texts(100, seed=5) + ODD:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)


def test_reload_identical(trained):
    tok, out = trained
    again = AutoTokenizer.from_pretrained(out)
    assert again.get_vocab() == tok.get_vocab()
    assert again.all_special_ids == tok.all_special_ids
    for text in ODD:
        assert again(text).input_ids == tok(text).input_ids


def test_deterministic(trained, tmp_path):
    tok, out = trained
    tok2 = train_sentencepiece(_texts(400), tmp_path, vocab_size=256, seed=0)
    assert (tmp_path / SPM_MODEL_FILE).read_bytes() == (out / SPM_MODEL_FILE).read_bytes()
    assert (tmp_path / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
    assert tok2.get_vocab() == tok.get_vocab()


def test_training_errors(tmp_path):
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_sentencepiece(["", ""], tmp_path)

    def stream():  # texts streamed from data that turns out bad half way
        yield from _texts(20)
        raise DataError("train.jsonl:21: answer 'x' is not a number")

    with pytest.raises(DataError, match="train.jsonl:21"):  # that error, not a "training failed" one
        train_sentencepiece(stream(), tmp_path / "bad")


def test_thinking_token(trained, tmp_path):
    _, out = trained
    tok = load_tokenizer(str(out))
    n = len(tok)
    tid = add_thinking_token(tok)
    assert tid == n and len(tok) == n + 1
    assert add_thinking_token(tok) == tid and len(tok) == n + 1  # idempotent
    ids = tok.encode("## Step 1:<thinking>3+4=7", add_special_tokens=False)
    assert ids.count(tid) == 1
    assert tok.decode(ids) == "## Step 1:<thinking>3+4=7"
    assert tok.decode(ids, skip_special_tokens=True) == "## Step 1:3+4=7"
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert add_thinking_token(again) == tid and len(again) == n + 1
    assert again.encode("a<thinking>b", add_special_tokens=False) == tok.encode(
        "a<thinking>b", add_special_tokens=False
    )
