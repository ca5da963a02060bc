"""``ltscale generate``: answer one question with a checkpoint's decoding, latent steps marked.

The same load and decode as ``ltscale eval`` (the checkpoint's own method unless ``--method``), so
the text shown is the text eval scores for that question.
"""

from __future__ import annotations

import argparse
import sys

from ltscale.cli import common
from ltscale.eval.evaluate import generated_text
from ltscale.eval.extraction import THINKING_TOKEN, extract_answer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer one question, showing the latent steps")
    common.add_checkpoint_args(p)
    p.add_argument("question")
    p.add_argument(
        "--marker", default="\u27e8latent\u27e9", help="how a latent step is shown (default: ⟨latent⟩)"
    )
    p.set_defaults(func=run)


def _console_marker(marker: str) -> str:
    """Fall back to ``<thinking>`` when stdout cannot encode the marker (e.g. a C locale)."""
    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        marker.encode(enc)
    except (UnicodeEncodeError, LookupError):
        return "<thinking>"
    return marker


def run(args: argparse.Namespace) -> int:
    ckpt = common.checkpoint_arg(args.checkpoint)
    if not args.question.strip():
        raise common.UserError("the question is empty")
    inf = common.load_inference(args, ckpt)
    eos = inf.tokenizer.eos_token_id
    out = inf.generate_many(
        [inf.prompt_ids(args.question)],
        args.max_new_tokens,
        slots=1,
        eos_token_id=eos,
        without_thinking=args.without_thinking,
    )
    n = int(out.lengths[0])
    text, ended = generated_text(inf.tokenizer, out.sequences[0, :n].tolist(), inf.thinking_token_id, eos)
    answer = extract_answer(text)
    print(text.replace(THINKING_TOKEN, _console_marker(args.marker)))
    print()
    print(f"answer: {answer if answer else '(none)'}")
    stopped = "  (cut at --max-new-tokens)" if not ended and n >= args.max_new_tokens else ""
    print(f"latent steps: {int(out.num_latent[0])}  generated tokens: {n}{stopped}")
    return common.EXIT_OK
