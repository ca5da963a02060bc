"""How the lm-eval backend reaches an ltscale checkpoint: load it, encode a context, decode, cut.

Free of ``lm_eval`` imports, so these rules are testable without the ``[eval]`` extra and the
backend (``ltscale.lmeval.backend``) stays a thin adapter to lm-eval's request objects.

Decisions (and why):

* **One load path, one decode path.** :func:`load` and :func:`generate` hand over to what
  ``ltscale eval`` runs: ``ltscale.inference.load_for_inference`` (the checkpoint with its method's
  decoding) and ``Inference.generate_many`` (the one decode loop, continuous batching). Prompts are
  fed in ``ltscale eval``'s order (longest first, stable) with ``batch_size`` rows in flight, so a
  checkpoint decodes bit for bit as ``ltscale eval`` decodes it, for every method.
* **Greedy only.** Latent steps are a deterministic function of the hidden state, and ltscale's
  decoders (and the paper's protocol) are greedy; a request with ``do_sample=True`` or a positive
  temperature is rejected naming its task, rather than silently decoded greedily.
* **Stop strings.** A row's text (latent steps rendered as ``<thinking>``, the final EOS dropped,
  as ``ltscale eval`` writes ``generated_text``) is cut with lm-eval's own rule
  (:func:`cut_at_stops`). The decode loop's per-row ``stop`` ends the row as soon as no further
  token can change that cut (:func:`stop_settled`), so a checkpoint that never emits EOS stops at
  its stop string instead of running to ``max_gen_toks``, and the answer is the one the full
  decode would give.
* **Encoding.** An lm-eval context is encoded as ltscale encodes a prompt (:func:`context_ids`):
  ltscale's own prompt for a question goes through ``ltscale.data.formatting.prompt_ids``; any
  other text gets the same treatment (bos when the tokenizer has one, text without added special
  tokens). A method that appends ids to every prompt (Coconut's ``<bot>``, SoftCoT's thought
  slots) gets them appended here too (``Inference.prompt_suffix``, :attr:`Loaded.suffix`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ltscale.config import ConfigError
from ltscale.eval.evaluate import decode_generated, generated_text

if TYPE_CHECKING:
    from ltscale.inference import Inference

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "Generation",
    "Loaded",
    "cut_at_stops",
    "context_ids",
    "generate",
    "greedy_settings",
    "load",
    "stop_settled",
]

#: Rows in flight when neither ``--batch_size`` nor ``batch_size=`` says otherwise (= ``ltscale eval``).
DEFAULT_BATCH_SIZE = 16

# ltscale's plain prompt (ltscale.data.formatting.plain_prompt_text) with the question captured.
_PLAIN_PROMPT = re.compile(r"Question: (?P<q>.*)\nAnswer:\n", re.DOTALL)


@dataclass
class Loaded:
    """A checkpoint ready to decode with its method, and whether requests decode purely explicitly."""

    inference: Inference
    without_thinking: bool = False

    @property
    def tokenizer(self) -> Any:
        return self.inference.tokenizer

    @property
    def path(self) -> Path | None:
        return self.inference.path

    @property
    def method(self) -> str:
        return self.inference.method

    @property
    def suffix(self) -> list[int]:
        """The ids the method appends to every prompt (Coconut's ``<bot>``, SoftCoT's slots)."""
        return self.inference.prompt_suffix

    @property
    def lm(self) -> Any:
        """The decoded ``LatentLM`` (its ``base`` scores explicit-mode requests)."""
        return self.inference.model


@dataclass
class Generation:
    """One decoded row, as ``ltscale eval`` reports it."""

    text: str  # latent steps as <thinking>, final EOS dropped, not yet cut at stop strings
    num_latent: int
    num_generated: int  # every generated position, latent steps and the EOS included
    truncated: bool  # hit max_new_tokens without EOS


def load(
    checkpoint: str | Path,
    *,
    method: str | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    mode: str | None = None,
    device: str = "cpu",
    dtype: Any = None,
    without_thinking: bool = False,
) -> Loaded:
    """Load ``checkpoint`` (HF dir, stage dir or run dir) with its own method unless ``method``.

    Raises ``FileNotFoundError`` for a missing checkpoint and ``ValueError`` for a bad method
    or option, both with messages naming what was wrong.
    """
    from ltscale.inference import load_for_inference  # torch and the model package

    try:
        inference = load_for_inference(checkpoint, method, options, mode=mode, device=device, dtype=dtype)
    except (ConfigError, TypeError) as e:
        raise ValueError(f"method={method}: {e}") from None
    return Loaded(inference=inference, without_thinking=without_thinking)


def context_ids(tokenizer: Any, context: str, messages: Sequence[dict[str, str]] | None = None) -> list[int]:
    """Token ids of an lm-eval context, encoded as ltscale encodes a prompt (no method suffix).

    ``messages``: the chat the context was rendered from by the backend's ``apply_chat_template``
    (``--apply_chat_template``). A single user turn is ltscale's chat prompt for that text;
    other chats (a system turn, few-shot turns) are the rendered text, whose template spells its
    own special tokens. Without a chat, ltscale's plain prompt of a question is encoded by the
    formatting module; any other text gets bos (when the tokenizer has one) + the text.
    """
    from ltscale.data.formatting import prompt_ids

    if messages is not None:
        if len(messages) == 1 and messages[0].get("role") == "user":
            return list(prompt_ids(tokenizer, messages[0]["content"], use_chat_template=True))
        return list(tokenizer.encode(context, add_special_tokens=False))
    m = _PLAIN_PROMPT.fullmatch(context)
    if m is not None:
        return list(prompt_ids(tokenizer, m.group("q"), use_chat_template=False))
    bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    return bos + list(tokenizer.encode(context, add_special_tokens=False))


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` cut at its stop strings exactly as lm-eval's HF backend cuts a generation.

    lm-eval (``postprocess_generated_text``) splits on each stop string in turn and keeps what
    precedes the first occurrence, skipping empty strings; with overlapping stop strings the order
    matters, and this keeps that order. ``tests/unit/test_lmeval.py`` checks it against lm-eval's
    function.
    """
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


def stop_settled(text: str, stops: Sequence[str]) -> bool:
    """Whether every continuation of ``text`` has the same :func:`cut_at_stops` as ``text``, so a
    row can stop decoding.

    The cut is sequential: take the first stop string (in ``stops`` order) that occurs in ``text``;
    its first occurrence is final. An earlier stop string that does not occur yet could still start
    inside ``text`` and end in a later token, cutting before the found one: so the text after the
    found occurrence must be at least as long as each earlier stop string minus one character.
    ``text`` must be a prefix of every later decode of the row (trailing U+FFFD, an incomplete
    UTF-8 character, is left out).
    """
    text = text.rstrip("\ufffd")
    longest = 0
    for stop in stops:
        if not stop:
            continue
        at = text.find(stop)
        if at >= 0:
            return len(text) - (at + len(stop)) >= longest - 1
        longest = max(longest, len(stop))
    return False


def greedy_settings(gen_kwargs: dict[str, Any], *, default_max: int, where: str) -> tuple[list[str], int]:
    """``(until, max_gen_toks)`` of a request's generation kwargs; anything but greedy is an error.

    Accepts lm-eval's spellings (``max_gen_toks`` and its aliases ``max_new_tokens``/``max_tokens``/
    ``max_completion_tokens``, ``until`` as a string or list); ``top_p``/``top_k`` only matter when
    sampling and are ignored. ``where`` names the task in the error.
    """
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None)
    until = [] if until is None else [until] if isinstance(until, str) else list(until)
    if not all(isinstance(s, str) for s in until):
        raise ValueError(f"{where}: until must be strings, got {until!r}")
    max_gen = default_max
    for key in (
        "max_completion_tokens",
        "max_tokens",
        "max_new_tokens",
        "max_gen_toks",
    ):  # lowest priority first
        value = kwargs.pop(key, None)
        if value is not None:
            max_gen = int(value)
    if max_gen < 1:
        raise ValueError(f"{where}: max_gen_toks must be >= 1, got {max_gen}")
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    do_sample = kwargs.pop("do_sample", None)
    if do_sample or (do_sample is None and temperature > 0):
        raise ValueError(
            f"{where}: sampling (do_sample={do_sample}, temperature={temperature}) is not supported: ltscale "
            "decodes greedily (latent steps are deterministic); use --gen_kwargs do_sample=False,temperature=0"
        )
    for key in ("top_p", "top_k"):
        kwargs.pop(key, None)
    if kwargs:
        raise ValueError(
            f"{where}: unsupported generation kwargs {sorted(kwargs)} (supported: until, max_gen_toks, "
            "do_sample=False, temperature=0; top_p/top_k are ignored when not sampling)"
        )
    return until, max_gen


def generate(
    loaded: Loaded,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    slots: int,
    on_finish: Callable[[int], None] | None = None,
    stops: Sequence[Sequence[str]] | None = None,
) -> list[Generation]:
    """Decode ``prompts`` (ids, suffix included) with ``slots`` rows in flight; results in input order.

    ``stops``: each prompt's stop strings in cutting order; its row ends once :func:`stop_settled`.
    """
    if not prompts:
        return []
    inf = loaded.inference
    order = sorted(range(len(prompts)), key=lambda j: -len(prompts[j]))  # ltscale eval's order
    eos = inf.tokenizer.eos_token_id
    stop = None
    if stops is not None and any(any(s) for s in stops):

        def stop(b: int, ids: list[int]) -> bool:
            text = decode_generated(inf.tokenizer, ids, inf.thinking_token_id)
            return stop_settled(text, stops[order[b]])

    out = inf.generate_many(
        [list(prompts[j]) for j in order],
        max_new_tokens,
        slots=slots,
        eos_token_id=eos,
        without_thinking=loaded.without_thinking,
        on_finish=on_finish,
        stop=stop,
    )
    done: dict[int, Generation] = {}
    for b, j in enumerate(order):
        n = int(out.lengths[b])
        text, ended = generated_text(inf.tokenizer, out.sequences[b, :n].tolist(), inf.thinking_token_id, eos)
        done[j] = Generation(
            text=text,
            num_latent=int(out.num_latent[b]),
            num_generated=n,
            truncated=not ended and n >= max_new_tokens,
        )
    return [done[j] for j in range(len(prompts))]
