"""Saving/loading a LatentLM as a Hugging Face ``save_pretrained`` dir plus its latent meta.

Kept in ``ltscale.model`` (torch + transformers only) so ``ltscale eval`` and other tools load a
checkpoint without DeepSpeed; plain ``transformers`` loads the base model from the same dir. What
goes into the dir, and the meta format, are ``ltscale.rundir``'s.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ltscale import rundir
from ltscale.fsutil import chmod_to_umask
from ltscale.model.hf_weights import DEFAULT_MAX_SHARD_BYTES, write_hf_weights
from ltscale.model.latent_lm import LatentLM


def split_state_dict(latent_state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """``LatentLM.state_dict()`` keys -> (base model keys, adapter keys)."""
    base = {k[len("base."):]: v for k, v in latent_state.items() if k.startswith("base.")}
    adapter = {k[len("adapter."):]: v for k, v in latent_state.items() if k.startswith("adapter.")}
    return base, adapter


def save_latent_model(out_dir: str | Path, *, config, latent_state: dict[str, torch.Tensor], tokenizer,
                      latent_config: dict[str, Any], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write an HF ``save_pretrained`` dir (+ tokenizer + latent config) atomically.

    The weights are written as they are in ``latent_state`` (the training dtype: the gathered
    16-bit copy of a bf16 run) by :func:`write_hf_weights`, with no model built to hold them.
    Plain ``transformers`` loads the base model from it; ``load_latent_model`` adds the latent
    behaviour back.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    base_state, adapter_state = split_state_dict(latent_state)
    write_hf_weights(tmp, config, base_state, max_shard_bytes=max_shard_bytes, eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(tmp)
    if adapter_state:
        save_file({k: v.contiguous() for k, v in adapter_state.items()}, str(tmp / rundir.ADAPTER_FILE))
    # Modules a method adds around the base (e.g. SoftCoT's projection), under their state-dict names.
    extra = {k: v.contiguous() for k, v in latent_state.items() if not k.startswith(("base.", "adapter."))}
    if extra:
        save_file(extra, str(tmp / rundir.EXTRA_FILE))
    rundir.write_meta(tmp, latent_config)
    for written in tmp.iterdir():  # safetensors writes 0600; a group sharing the run dir must read it
        chmod_to_umask(written)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def load_latent_model(path: str | Path, *, mode: str | None = None, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> tuple[LatentLM, Any]:
    """Load a dir written by ``save_latent_model`` (or ``ltscale export``) for eval/generation."""
    path = Path(path)
    meta = rundir.read_meta(path)
    if not meta:
        raise FileNotFoundError(f"{path / rundir.LATENT_META_FILE}: not an ltscale checkpoint (no {rundir.LATENT_META_FILE})")
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    base = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs).to(device)
    lm = LatentLM(base, meta["thinking_token_id"], mode=mode or meta["mode"], alpha=meta["alpha"],
                  temperature=meta["temperature"], top_p=meta["top_p"], adapter=bool(meta.get("adapter")),
                  adapter_hidden=meta.get("adapter_hidden") or 1024, vocab_tokens=len(tokenizer))
    if lm.adapter is not None:
        lm.adapter.load_state_dict(load_file(str(path / rundir.ADAPTER_FILE)))
        lm.adapter.to(device=device, dtype=next(base.parameters()).dtype)
    return lm.eval(), tokenizer
