"""Building the base model and adding the ``<thinking>`` token to model and tokenizer."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"model.dtype: {name!r} not in auto|{'|'.join(DTYPES)}")
    return DTYPES[name]


def build_base_model(*, name_or_path: str | None, init: dict[str, Any], vocab_size: int, dtype: torch.dtype,
                     attn_implementation: str = "sdpa", gguf_file: str | None = None,
                     trust_remote_code: bool = False, seed: int = 0) -> torch.nn.Module:
    """A pretrained HF causal LM (hub name or local dir, GGUF allowed), or a random Llama from ``init``."""
    if name_or_path:
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation,
                                  "trust_remote_code": trust_remote_code}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    torch.manual_seed(seed)
    config = LlamaConfig(**{**init, "vocab_size": vocab_size}, attn_implementation=attn_implementation)
    return LlamaForCausalLM(config).to(dtype)


def init_thinking_embedding(model: torch.nn.Module, tokenizer, thinking_id: int, init_from: str = "emm") -> None:
    """Make room for ``<thinking>`` (already added to the tokenizer) and init its rows (spec §10.13).

    The new input and output rows are copied from ``init_from`` (EOS when it is not a single
    token). Only the output row matters in latent modes (the input row is always replaced), but
    both are copied so ``pause`` starts from a sensible embedding too. Call it on a fresh base
    model only, never on a checkpoint that already learned the row.
    """
    if model.get_input_embeddings().weight.shape[0] <= thinking_id:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    src = tokenizer.encode(init_from, add_special_tokens=False)
    src_id = src[0] if len(src) == 1 else tokenizer.eos_token_id
    with torch.no_grad():
        inp = model.get_input_embeddings().weight
        inp[thinking_id] = inp[src_id]
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != inp.data_ptr():
            out.weight[thinking_id] = out.weight[src_id]
