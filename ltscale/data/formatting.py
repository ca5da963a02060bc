"""Record -> token ids + labels, in the paper's training format (docs/method.md §8, §11.15).

The response is always ``"## Step i: <step>\\n" ... "The final answer is:\\n### <answer>"`` + EOS,
so that eval can extract the answer after the last ``#`` exactly like the official scorer.
The prompt is the tokenizer's chat template (user turn = question, generation prompt on) when it
has one, as the official code does; tokenizers without a template (our sentencepiece one, base
models) get ``bos + "Question: <q>\\nAnswer:\\n"``.

With a chat template, the response ends the way the template ends an assistant turn: ``load_tokenizer``
makes that token the tokenizer's EOS (:func:`align_eos_with_chat_template`), so training appends it
and decoding stops on it everywhere (``<|im_end|>`` for Qwen's format even in a base model's
tokenizer, ``<|eot_id|>`` for Llama 3, ``<end_of_turn>`` for Gemma). Templates that render the date
(Llama 3.2's ``strftime_now``) get a fixed one (``CHAT_TEMPLATE_KWARGS``), so the same question
always gives the same prompt ids.

Question and response text come from data or from a user, so a special-token string typed inside
them (``<thinking>``, ``</s>``, a template's ``<|im_end|>``) is encoded as the plain text it is,
never as that token: otherwise a question could trigger latent steps or end its own turn. Only
the prompt template's own markup and the ids added here (bos, eos) are special. Every path that
turns text into ids (training, eval, ``ltscale generate``, the methods' prompts) goes through
:func:`prompt_ids` / :func:`encode_plain` for that reason.

Prompt and response are tokenised separately and concatenated. That is the sequence the model
sees at inference (the prompt is encoded alone, the response is generated token by token), so
training on it avoids a train/inference mismatch at the boundary that joint tokenisation can
create with BPE merges across it. Labels are -100 on the prompt and the token ids elsewhere,
EOS included (the model must learn to stop).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .records import DataError, Record

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "CHAT_TEMPLATE_KWARGS",
    "IGNORE_INDEX",
    "Encoded",
    "align_eos_with_chat_template",
    "assistant_text",
    "chat_end_of_turn",
    "encode_batches",
    "encode_example",
    "encode_id_batches",
    "encode_plain",
    "encode_records",
    "length_error",
    "plain_prompt_text",
    "prompt_ids",
]

IGNORE_INDEX = -100
_BATCH = 1024
#: Variables every chat template is rendered with. Llama 3.x templates print "Today Date" from
#: ``date_string``, else from the clock: fixed to the templates' own fallback for reproducible ids.
CHAT_TEMPLATE_KWARGS = {"date_string": "26 Jul 2024"}
# Private-use characters no template adds, to find where an assistant message's content ends.
_MARK = "\ue000ltscale\ue001"


@dataclass
class Encoded:
    """One tokenised training sequence. ``labels[t]`` is the target at position t (HF convention:
    the model shifts internally), -100 where no loss is taken; ``prompt_len`` tokens of prompt."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    id: str

    def __len__(self) -> int:
        return len(self.input_ids)


def assistant_text(record: Record) -> str:
    """The response text of the official code (docs/method.md §8), without EOS."""
    steps = "".join(f"## Step {i}: {s}\n" for i, s in enumerate(record.steps, 1))
    return steps + f"The final answer is:\n### {record.answer}"


def plain_prompt_text(question: str) -> str:
    """Prompt for tokenizers without a chat template (bos is added as an id, not as text)."""
    return f"Question: {question}\nAnswer:\n"


def _uses_chat_template(tokenizer: PreTrainedTokenizerBase, use_chat_template: bool | None) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is None:
        return has_template
    if use_chat_template and not has_template:
        raise ValueError(f"use_chat_template=True but {type(tokenizer).__name__} has no chat template")
    return use_chat_template


def _render_chat(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    # Render to text, then tokenise: templates spell out their own bos (e.g. "<|begin_of_text|>");
    # tokenize=True returns a BatchEncoding in transformers 5.x.
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        tokenize=False,
        **CHAT_TEMPLATE_KWARGS,
    )


def chat_end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token the chat template writes right after an assistant message's content.

    ``None`` without a template, or when what follows the content is not a special token (then
    the tokenizer's EOS stays the response terminator).
    """
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        return None
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, **CHAT_TEMPLATE_KWARGS)
    except TemplateError as e:
        logger.warning("chat template cannot render an assistant turn (%s); responses end with eos", e)
        return None
    if not isinstance(text, str) or _MARK not in text:
        return None
    ids = tokenizer.encode(text.split(_MARK, 1)[1], add_special_tokens=False)
    specials = set(tokenizer.all_special_ids)
    specials |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return tokenizer.convert_ids_to_tokens(ids[0]) if ids and ids[0] in specials else None


def align_eos_with_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the template's end-of-assistant-turn token the EOS (see the module docstring).

    Instruct tokenizers already have it as EOS; base tokenizers that ship the same template (Qwen2.5,
    Llama 3.x) and Gemma's (``<eos>`` vs ``<end_of_turn>``) do not.
    """
    end = chat_end_of_turn(tokenizer)
    if end is not None and end != tokenizer.eos_token:
        logger.info("eos %r -> %r: the chat template ends assistant turns with it", tokenizer.eos_token, end)
        tokenizer.eos_token = end


def _prefix_ids(tokenizer: PreTrainedTokenizerBase, chat: bool) -> list[int]:
    if chat or tokenizer.bos_token_id is None:
        return []
    return [tokenizer.bos_token_id]


def _encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], *, plain: bool) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False, split_special_tokens=plain)["input_ids"]``.

    A fast tokenizer's own batch encoder is called directly (without offsets): the same ids, and
    tokenizing a 385k-problem training set is dominated by this call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or backend.truncation is not None or backend.padding is not None:
        out = tokenizer(texts, add_special_tokens=False, split_special_tokens=plain)["input_ids"]
        return [list(ids) for ids in out]
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = plain
    try:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = previous


def encode_plain(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Ids of data or user text with every special-token string in it encoded as plain text.

    Identical to ``tokenizer(texts, add_special_tokens=False)`` for text without such strings.
    """
    return _encode_texts(tokenizer, list(texts), plain=True) if texts else []


def _special_text_re(tokenizer: PreTrainedTokenizerBase) -> re.Pattern | None:
    """A regex matching any special-token string of ``tokenizer`` (None: it has none)."""
    specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    specials.update(t.content for t in added.values() if getattr(t, "special", False))
    specials.discard("")
    if not specials:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


_QUESTION_MARK = "\x00ltscale-question\x00"


def _chat_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, question: str, special: re.Pattern | None
) -> list[int]:
    """The chat prompt; a question holding special-token text is encoded apart from the template.

    The template is rendered with the question and split around it (templates may trim or
    otherwise render the content, so the question is located between the template's own prefix
    and suffix, found by rendering a marker). Prefix and suffix keep their special tokens; the
    question's are plain text. A question without such text is encoded joined with its template,
    exactly as rendered.
    """
    text = _render_chat(tokenizer, question)
    if special is None or not special.search(question):
        return _encode_texts(tokenizer, [text], plain=False)[0]
    marked = _render_chat(tokenizer, _QUESTION_MARK)
    if marked.count(_QUESTION_MARK) != 1:
        raise ValueError(
            f"{type(tokenizer).__name__}: the chat template does not render the user message verbatim"
        )
    prefix, suffix = marked.split(_QUESTION_MARK)
    if not (text.startswith(prefix) and text.endswith(suffix) and len(text) >= len(prefix) + len(suffix)):
        raise ValueError(
            f"{type(tokenizer).__name__}: cannot separate the question from its chat template "
            "(needed to encode the special-token text it contains as plain text)"
        )
    middle = text[len(prefix) : len(text) - len(suffix)]
    ids = _encode_texts(tokenizer, [prefix, suffix], plain=False)
    return ids[0] + encode_plain(tokenizer, [middle])[0] + ids[1]


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, question: str, *, use_chat_template: bool | None = None
) -> list[int]:
    """Token ids of the prompt for ``question``; what generation starts from.

    ``use_chat_template=None`` uses the tokenizer's chat template when it has one. Special-token
    text inside ``question`` is plain text (module docstring).
    """
    chat = _uses_chat_template(tokenizer, use_chat_template)
    if chat:
        return _chat_prompt_ids(tokenizer, question, _special_text_re(tokenizer))
    return _prefix_ids(tokenizer, chat) + encode_plain(tokenizer, [plain_prompt_text(question)])[0]


def length_error(rid: str, n_prompt: int, n_response: int, max_length: int | None) -> DataError | None:
    """The error for a sequence (prompt + response + eos) longer than ``max_length``, else None."""
    n = n_prompt + n_response + 1
    if max_length is None or n <= max_length:
        return None
    return DataError(
        f"{rid}: sequence of {n} tokens exceeds max_length={max_length} "
        f"(prompt {n_prompt}, response {n_response + 1} incl. eos)"
    )


def _assemble(
    rid: str, prompt: list[int], response: list[int], eos_id: int, max_length: int | None
) -> Encoded:
    error = length_error(rid, len(prompt), len(response), max_length)
    if error is not None:
        raise error
    labels = [IGNORE_INDEX] * len(prompt) + response + [eos_id]
    return Encoded(input_ids=prompt + response + [eos_id], labels=labels, prompt_len=len(prompt), id=rid)


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos token; training needs one to learn to stop")
    return tokenizer.eos_token_id


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    record: Record,
    *,
    use_chat_template: bool | None = None,
    max_length: int | None = None,
) -> Encoded:
    """Prompt ids + response ids (``add_special_tokens=False``) + eos, with prompt labels masked.

    Raises :class:`DataError` naming the record id and lengths when the sequence is longer than
    ``max_length``; whether to skip is the caller's decision (see :func:`encode_records`).
    """
    eos = _eos_id(tokenizer)
    prompt = prompt_ids(tokenizer, record.question, use_chat_template=use_chat_template)
    response = encode_plain(tokenizer, [assistant_text(record)])[0]
    return _assemble(record.id, prompt, response, eos, max_length)


def _prompt_batch(
    tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], chat: bool
) -> list[list[int]]:
    """:func:`prompt_ids` of many questions in few tokenizer calls."""
    if not chat:
        prefix = _prefix_ids(tokenizer, chat)
        return [prefix + ids for ids in encode_plain(tokenizer, [plain_prompt_text(q) for q in questions])]
    special = _special_text_re(tokenizer)
    joined = [i for i, q in enumerate(questions) if special is None or not special.search(q)]
    out: list[list[int] | None] = [None] * len(questions)
    if joined:
        rendered = _encode_texts(
            tokenizer, [_render_chat(tokenizer, questions[i]) for i in joined], plain=False
        )
        for i, ids in zip(joined, rendered):
            out[i] = ids
    return [
        ids if ids is not None else _chat_prompt_ids(tokenizer, q, special) for q, ids in zip(questions, out)
    ]


def encode_id_batches(
    tokenizer: PreTrainedTokenizerBase,
    records: Iterable[Record],
    *,
    use_chat_template: bool | None = None,
    batch_size: int = _BATCH,
) -> Iterator[tuple[list[Record], list[list[int]], list[list[int]]]]:
    """``(records, prompt ids, response ids without eos)`` per batch of ``batch_size`` records of a
    stream: the tokenizer work of :func:`encode_example`, a batch per tokenizer call (fast
    tokenizers parallelise a batch; one call per record is ~10x slower on GSM8K-Aug sized data)."""
    _eos_id(tokenizer)
    chat = _uses_chat_template(tokenizer, use_chat_template)

    it = iter(records)
    while chunk := list(itertools.islice(it, batch_size)):
        prompts = _prompt_batch(tokenizer, [r.question for r in chunk], chat)
        yield chunk, prompts, encode_plain(tokenizer, [assistant_text(r) for r in chunk])


def encode_batches(
    tokenizer: PreTrainedTokenizerBase,
    records: Iterable[Record],
    *,
    use_chat_template: bool | None = None,
    max_length: int | None = None,
    strict: bool = True,
    batch_size: int = _BATCH,
) -> Iterator[list[tuple[Record, Encoded]]]:
    """:func:`encode_example` over a stream of records; yields each batch's kept
    ``(record, encoded)`` pairs and never holds more than one batch.

    ``strict=False`` drops over-long sequences and logs how many, instead of raising.
    """
    eos = _eos_id(tokenizer)
    n_seen = n_dropped = 0
    for chunk, prompts, responses in encode_id_batches(
        tokenizer, records, use_chat_template=use_chat_template, batch_size=batch_size
    ):
        n_seen += len(chunk)
        kept = []
        for r, p, a in zip(chunk, prompts, responses):
            try:
                kept.append((r, _assemble(r.id, p, a, eos, max_length)))
            except DataError:
                if strict:
                    raise
                n_dropped += 1
        yield kept
    if n_dropped:
        logger.warning("dropped %d of %d records longer than max_length=%s", n_dropped, n_seen, max_length)


def encode_records(
    tokenizer: PreTrainedTokenizerBase,
    records: Iterable[Record],
    *,
    use_chat_template: bool | None = None,
    max_length: int | None = None,
    strict: bool = True,
) -> list[Encoded]:
    """:func:`encode_batches` collected into one list (small data: eval sets, tests)."""
    batches = encode_batches(
        tokenizer, records, use_chat_template=use_chat_template, max_length=max_length, strict=strict
    )
    return [e for kept in batches for _, e in kept]
