"""A small sentencepiece tokenizer for the embedded default, wrapped as a Hugging Face tokenizer.

Why sentencepiece + a ``tokenizers`` wrapper: training is sentencepiece's job (fast, seeded,
``split_digits`` and ``byte_fallback`` built in), but every other part of ltscale talks to a
``PreTrainedTokenizerBase`` (chat templates, ``save_pretrained``/``AutoTokenizer``, export). In
transformers 5.x ``LlamaTokenizer`` is a ``tokenizers``-backed class whose ``__init__`` rebuilds
its own normalizer and pre-tokenizer (Llama's Metaspace scheme) from vocab+merges, which would not
encode like our model. So the sentencepiece BPE model is converted here into a
``tokenizers.Tokenizer`` that reproduces ``SentencePieceProcessor.encode`` exactly (a test checks
id-for-id parity) and wrapped in the generic ``PreTrainedTokenizerFast`` (= ``TokenizersBackend``).
``save_pretrained`` writes ``tokenizer.json`` + ``tokenizer_config.json`` with
``tokenizer_class: TokenizersBackend``, which ``AutoTokenizer`` reloads identically, with no
custom code. The sentencepiece model is kept next to them as ``sentencepiece.model`` for
provenance (not named ``tokenizer.model``, so no loader mistakes it for a slow-tokenizer file).

Fixed ids: ``<unk>`` 0, ``<s>`` (bos) 1, ``</s>`` (eos) 2, ``<pad>`` 3 (distinct from eos, so
padding can never be confused with an end of sequence), ``"\\n"`` 4, ``"#"`` 5, then 256 byte
pieces ``<0x00>``..``<0xFF>`` (ids 6..261), then learned pieces. Encoding adds bos (Llama
convention), never eos.

Newlines: sentencepiece normally folds whitespace; here normalization is ``identity``,
``remove_extra_whitespaces=False`` and ``"\\n"`` is a user-defined piece, so any text (newlines,
runs of spaces, tabs, non-ASCII via bytes) decodes back to itself.
"""

from __future__ import annotations

import io
import itertools
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .formatting import align_eos_with_chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = ["SPM_MODEL_FILE", "add_thinking_token", "load_tokenizer", "train_sentencepiece"]

SPM_MODEL_FILE = "sentencepiece.model"
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
USER_SYMBOLS = ("\n", "#")
N_BYTE_PIECES = 256
# sentencepiece piece types (sentencepiece_model.proto)
_NORMAL, _USER_DEFINED = 1, 4


def _spm_proto(texts: Iterable[str], vocab_size: int, seed: int) -> bytes:
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            model_type="bpe",
            # The 256 byte-fallback pieces come on top of the requested size: otherwise a
            # "vocab_size=256" model could not exist at all (bytes alone fill it).
            vocab_size=vocab_size + N_BYTE_PIECES,
            hard_vocab_limit=False,  # a tiny corpus yields fewer pieces instead of an error
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            user_defined_symbols=list(USER_SYMBOLS),
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            pad_piece=PAD,
            max_sentence_length=1 << 20,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,  # determinism: same texts + seed -> byte-identical model
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"sentencepiece training failed ({e}); vocab_size={vocab_size} must exceed the number of "
            "distinct characters in the texts plus 6 reserved pieces"
        ) from e
    return buf.getvalue()


def _hf_backend_from_proto(proto_bytes: bytes):
    """A ``tokenizers.Tokenizer`` that encodes exactly like ``SentencePieceProcessor`` on this model.

    Mirrors sentencepiece's pipeline for our training options: no normalization except
    space -> "▁", user-defined pieces emitted whole, BPE merges ranked by piece score (higher
    score = earlier merge), byte fallback for unseen characters. ``test_tokenizer.py`` checks
    id-for-id parity with ``SentencePieceProcessor``.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import import_protobuf

    model_pb2 = import_protobuf()
    proto = model_pb2.ModelProto()
    proto.ParseFromString(proto_bytes)
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _NORMAL}
    ranked = []
    for token, (score, i) in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    merges = [(left, right) for _, _, left, right in sorted(ranked)]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    user = sorted((p.piece for p in pieces if p.type == _USER_DEFINED), key=len, reverse=True)
    if all(len(u) == 1 for u in user):
        # one plain-string split per symbol: the same pieces as the regex below, and tokenizing a
        # 385k-problem training set takes a quarter less time than with the regex
        isolate = [pre_tokenizers.Split(u, behavior="isolated") for u in user]
    else:  # longest symbol first, as sentencepiece matches them
        isolate = [pre_tokenizers.Split(Regex("|".join(re.escape(u) for u in user)), behavior="isolated")]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *isolate,
            # Learned pieces never cross a word start (split_by_whitespace: "▁" only as a prefix),
            # so cutting before each "▁" changes no result; it lets BPE work (and cache) per word.
            pre_tokenizers.Split("▁", behavior="merged_with_next"),
        ]
    )
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok


def train_sentencepiece(
    texts: Iterable[str],
    out_dir: str | Path,
    *,
    vocab_size: int = 256,
    seed: int = 0,
) -> PreTrainedTokenizerBase:
    """Train a BPE sentencepiece model on ``texts`` and save it as a Hugging Face tokenizer.

    ``vocab_size`` counts specials, user symbols, characters and learned merges; the 256
    byte-fallback pieces are added on top, so ``len(tokenizer) <= vocab_size + 256`` (fewer when
    the corpus is too small to fill it). Digits are always single tokens (``split_digits``), which
    is what lets a tiny model do column arithmetic. Deterministic for the same texts (in the same
    order) and seed. Returns the tokenizer as reloaded by ``AutoTokenizer.from_pretrained(out_dir)``
    so the caller holds exactly what a later run will load.
    """
    from transformers import PreTrainedTokenizerFast

    # A stream, not a list: rank 0 trains on every training text of a 385k-problem run.
    nonempty = (t for t in texts if t)
    first = next(nonempty, None)
    if first is None:
        raise ValueError("train_sentencepiece: no non-empty texts")
    count = [0]
    failure: list[BaseException] = []

    def counted() -> Iterator[str]:
        try:
            for t in itertools.chain([first], nonempty):
                count[0] += 1
                yield t
        except Exception as e:  # sentencepiece would report it as its own training failure
            failure.append(e)
            raise

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        proto = _spm_proto(counted(), vocab_size, seed)
    except ValueError:
        if failure:  # the texts' source failed (a bad data row): that is the error to report
            raise failure[0] from None
        raise
    (out / SPM_MODEL_FILE).write_bytes(proto)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=_hf_backend_from_proto(proto),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(out)
    tokenizer = load_tokenizer(str(out))
    logger.info(
        "trained sentencepiece tokenizer: %d pieces from %d texts -> %s", len(tokenizer), count[0], out
    )
    return tokenizer


def load_tokenizer(
    name_or_path: str, *, trust_remote_code: bool = False, **kwargs
) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` plus the fix-ups training needs: EOS = the chat template's
    end-of-turn token (``formatting.align_eos_with_chat_template``), and a pad token.

    Tokenizers without one (Llama-3, SmolLM2) get ``pad = eos``: padding is masked by position
    (attention mask, labels -100) everywhere in ltscale, never by id, so sharing the id is safe and
    avoids growing the embedding matrix. ``kwargs`` go to ``from_pretrained`` (e.g. ``gguf_file``).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    align_eos_with_chat_template(tokenizer)  # responses end as the template ends a turn (formatting.py)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        logger.info("%s has no pad token; using eos %r as pad", name_or_path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_thinking_token(tokenizer: PreTrainedTokenizerBase, token: str = "<thinking>") -> int:
    """Add ``token`` as a special added token and return its id; a no-op if already present.

    Special so that ``decode(skip_special_tokens=True)`` can hide latent steps while eval decodes
    with them kept. Not normalized, so it matches verbatim even inside words. The caller must
    resize the model's embeddings (``len(tokenizer)`` grows by one on first call).
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    if token in vocab:
        return vocab[token]
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise RuntimeError(f"failed to add {token!r} to {type(tokenizer).__name__}")
    return token_id
