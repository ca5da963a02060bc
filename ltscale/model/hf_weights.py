"""A causal LM's weights written as a Hugging Face ``save_pretrained`` directory, from a state dict.

Why not ``model.save_pretrained``: it needs a model that holds the weights. At the end of a stage
rank 0 has only the gathered state dict, and building a model to load it into would put a second
copy into host memory (an 8B model built from its config is 32 GB of random fp32 weights before
the real ones are copied in). Here the expected names and shapes come from the model built on the
``meta`` device (no storage), and each tensor is streamed into the file as it is: the file holds the
training dtype, and writing costs no copy of the state dict (``safetensors.torch.save_file`` first
turns every tensor into ``bytes``). The result is what ``save_pretrained`` writes: ``config.json``
(``architectures`` and ``dtype`` set), ``generation_config.json``, ``model.safetensors`` or shards
``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``, tied weights once.
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "expected_weights", "write_hf_weights", "write_safetensors"]

#: transformers' own default ``max_shard_size`` ("50GB").
DEFAULT_MAX_SHARD_BYTES = 50 * 10**9
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> int:
    """Write ``tensors`` in the safetensors format, one tensor at a time; returns the data bytes.

    Layout (the format's specification): an 8-byte little-endian header length, a JSON header
    naming each tensor's dtype, shape and ``[begin, end)`` byte range, padded with spaces to a
    multiple of 8, then the tensors' little-endian bytes back to back in header order.
    """
    header: dict[str, Any] = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return offset


def _model_class(config) -> type:
    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ValueError(
            f"{type(config).__name__}: no causal-LM class is registered for this config"
        ) from None


def expected_weights(config) -> tuple[dict[str, torch.Size], dict[str, str]]:
    """``({name: shape} written to the files, {tied name: the name it is stored under})``.

    From the model built on the ``meta`` device: names of its state dict (persistent buffers
    included); a name whose tensor is the same object as an earlier one's (a tied output
    embedding) is not written, as ``save_pretrained`` leaves it out.
    """
    with torch.device("meta"):
        model = _model_class(config)._from_config(copy.deepcopy(config))
    shapes: dict[str, torch.Size] = {}
    tied: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            tied[name] = first[id(t)]
            continue
        first[id(t)] = name
        shapes[name] = t.shape
    return shapes, tied


def write_hf_weights(
    out_dir: str | Path,
    config,
    state: dict[str, torch.Tensor],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    eos_token_id: int | None = None,
) -> list[Path]:
    """Write ``state`` (the base model's state dict, HF names) plus configs into ``out_dir``.

    ``eos_token_id``: the tokenizer's EOS, which ``config.json`` and ``generation_config.json`` then
    name. It differs from the base model's own when the tokenizer's EOS was moved to the chat
    template's end-of-turn token (``ltscale.data.formatting.align_eos_with_chat_template``): the
    model was trained to end its answers with that token, so ``generate`` of plain transformers
    has to stop there too. Raises ``RuntimeError`` naming every missing, unexpected or misshapen
    tensor. Returns the weight files written.
    """
    out_dir = Path(out_dir)
    shapes, tied = expected_weights(config)
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes) - set(tied))
    wrong = sorted(f"{k}: {tuple(state[k].shape)} != {tuple(v)}" for k, v in shapes.items()
                   if k in state and state[k].shape != v)  # fmt: skip
    if missing or unexpected or wrong:
        raise RuntimeError(
            f"state dict does not fit the model: missing={missing} unexpected={unexpected} wrong shapes={wrong}"
        )
    tensors = {k: state[k] for k in shapes}
    floating = [t.dtype for t in tensors.values() if t.is_floating_point()]
    config = copy.deepcopy(config)
    if floating:
        config.dtype = floating[0]
    config.architectures = config.architectures or [_model_class(config).__name__]
    if eos_token_id is not None:
        config.eos_token_id = int(eos_token_id)
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(out_dir / WEIGHTS_NAME, shards[0], meta)
        return [out_dir / WEIGHTS_NAME]
    files, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(out_dir / name, shard, meta)
        weight_map.update(dict.fromkeys(shard, name))
        files.append(out_dir / name)
    n_params = sum(t.numel() for t in tensors.values())
    index = {"metadata": {"total_parameters": n_params, "total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files
