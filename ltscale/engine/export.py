"""``ltscale export``: a ZeRO checkpoint, consolidated offline, as an HF ``save_pretrained`` dir.

Why a separate path from the stage-end ``stage{N}/hf`` export: that one is gathered from the live
engine, so it exists only for finished stages of runs that reached their stage end. A DeepSpeed
checkpoint (any tag, mid-stage included) is all a preempted or crashed job leaves behind, and
a user with one GPU-less login node must still be able to turn it into weights. So this runs in
one process with no process group: DeepSpeed's ``zero_to_fp32`` reads every rank's fp32 master
partition from disk and stitches the parameters back together.

What comes out is exactly what ``ltscale.model.io.save_latent_model`` writes (and the trainer's
stage export too): plain-``transformers`` loadable safetensors + tokenizer (with ``<thinking>``)
+ the latent meta (``ltscale.rundir.latent_meta``), rebuilt from the run config, plus a ``source``
entry there recording which checkpoint it came from.

zero_to_fp32 facts this relies on (deepspeed 0.19.8, checked on our checkpoints): keys are the
engine module's parameter names (``base.*``, ``adapter.*``); tied weights come back under both
names as one tensor (``shared_params``); non-persistent buffers (rotary ``inv_freq``) are not in
the checkpoint and are not needed; nothing in the files names the tag, so our ``.tmp-<tag>`` ->
``<tag>`` rename is invisible to it; it prints progress to stdout/stderr (captured here).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, LlamaConfig

from ltscale import rundir
from ltscale.config import StageConfig
from ltscale.data.tokenizer import add_thinking_token, load_tokenizer
from ltscale.engine.checkpoint import TRAIN_STATE_FILE
from ltscale.engine.checkpoint_dir import LATEST, TAG_PATTERN, TMP_PREFIX, latest_tag, list_checkpoints
from ltscale.engine.integrity import META_FILE
from ltscale.model.device import DTYPES
from ltscale.model.io import save_latent_model
from ltscale.precision import ENGINE_PRECISIONS

log = logging.getLogger(__name__)

__all__ = ["ExportError", "ExportSource", "consolidate", "export_checkpoint", "resolve_source"]

#: ``--dtype`` choices: the training precisions (what a checkpoint's master weights can be cast to).
EXPORT_DTYPES = ENGINE_PRECISIONS
# Input-embedding parameter names across HF causal LMs (Llama/Qwen/Mistral, GPT-2, BLOOM/Falcon).
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


class ExportError(Exception):
    """A user-facing problem with the export's input or output; the message names the path."""


@dataclass(frozen=True)
class ExportSource:
    """Where a checkpoint lives in the run-dir layout (``RUN_DIR/stage{N}/ckpt/<tag>``)."""

    run_dir: Path
    stage: int
    ckpt_root: Path
    tag: str | None


# ------------------------------------------------------------------------------ finding the checkpoint


def resolve_source(path: str | Path, *, tag: str | None = None, stage: int | None = None) -> ExportSource:
    """Map ``--checkpoint`` (run dir, stage dir, ``ckpt`` root or one tag dir) to an ExportSource.

    A run dir exports its highest *finished* stage unless ``stage`` says otherwise: an unfinished
    stage's latest checkpoint is mid-training, which the user must ask for explicitly.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ExportError(f"checkpoint not found: {p} is not a directory")
    if (p / META_FILE).is_file():  # one tag dir: RUN/stageN/ckpt/<tag>
        if tag is not None and tag != p.name:
            raise ExportError(f"--tag {tag} contradicts --checkpoint {p}, which is the checkpoint {p.name!r}")
        tag, p = p.name, p.parent
    if p.name == rundir.CKPT_DIR and rundir.stage_number(p.parent) is not None:  # a stage's ckpt root
        root, implied = p, rundir.stage_number(p.parent)
    elif rundir.stage_number(p) is not None and (p / rundir.CKPT_DIR).is_dir():  # a stage dir
        root, implied = p / rundir.CKPT_DIR, rundir.stage_number(p)
    elif rundir.is_run_dir(p):
        if stage is None:
            done = rundir.finished_stages(p)
            if not done:
                raise ExportError(
                    f"no finished stage in run dir {p} (no stage<N>/COMPLETE); "
                    "pass --stage N to export that stage's latest checkpoint"
                )
            stage = done[-1]
        root = rundir.ckpt_dir(p, stage)
        if not root.is_dir():
            raise ExportError(f"no checkpoints for stage {stage}: {root} does not exist")
        return ExportSource(run_dir=p, stage=stage, ckpt_root=root, tag=tag)
    else:
        raise ExportError(
            f"{p} is not an ltscale run dir, stage dir (stage<N>/ckpt) or checkpoint dir "
            f"(stage<N>/ckpt[/<tag>] with {META_FILE})"
        )
    if stage is not None and stage != implied:
        raise ExportError(
            f"--stage {stage} contradicts --checkpoint {path}, which belongs to stage {implied}"
        )
    return ExportSource(run_dir=root.parent.parent, stage=implied, ckpt_root=root, tag=tag)


def _checkpoint_dir(ckpt_root: Path, tag: str | None) -> Path:
    """The complete tag dir to read, with errors that say what *is* there."""
    if not ckpt_root.is_dir():
        raise ExportError(f"checkpoint root {ckpt_root} does not exist")
    if tag is None or tag == LATEST:
        tag = latest_tag(ckpt_root)
        if tag is None:
            raise ExportError(
                f"no checkpoint in {ckpt_root}: no 'latest' file and no complete checkpoint dir"
            )
    elif tag.startswith(TMP_PREFIX):
        raise ExportError(
            f"{ckpt_root / tag} is an unfinished save (crashed or in progress), not a checkpoint"
        )
    elif not TAG_PATTERN.match(tag):  # e.g. '../x'
        raise ExportError(f"--tag {tag!r} is not a checkpoint tag (in {ckpt_root})")
    path = ckpt_root / tag
    if not path.is_dir():
        have = ", ".join(list_checkpoints(ckpt_root)) or "none"
        raise ExportError(f"checkpoint {path} does not exist (complete checkpoints there: {have})")
    if not (path / META_FILE).is_file():
        raise ExportError(f"{path} is not an ltscale checkpoint (no {META_FILE})")
    return path


# ------------------------------------------------------------------------------ consolidation


def consolidate(ckpt_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Full state dict of a DeepSpeed checkpoint dir, offline, cast to ``dtype`` tensor by tensor.

    ZeRO 1-3: DeepSpeed's ``zero_to_fp32`` in lazy mode, so at most one fp32 tensor beyond the
    result is materialised (an 8B model exported as bf16 needs ~16 GB, not 32 + 16). Tied
    parameters stay one tensor. ZeRO 0 keeps whole weights in ``mp_rank_00_model_states.pt``.
    """
    meta = json.loads((ckpt_dir / META_FILE).read_text())
    if int(meta.get("zero_stage", 3)) == 0:
        states = torch.load(ckpt_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            lazy = get_fp32_state_dict_from_zero_checkpoint(
                str(ckpt_dir.parent), tag=ckpt_dir.name, lazy_mode=True
            )
    except (OSError, ValueError, KeyError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        # missing/foreign/corrupt shard files: DeepSpeed's messages name the file, ours the checkpoint
        raise ExportError(f"cannot consolidate {ckpt_dir}: {type(e).__name__}: {e}") from None
    finally:
        log.debug("zero_to_fp32 output:\n%s", chatter.getvalue())
    out: dict[str, torch.Tensor] = {}
    done: dict[int, str] = {}
    for name, t in lazy.items():
        if id(t) in done:  # a tied weight: the same lazy tensor under two names
            out[name] = out[done[id(t)]]
            continue
        full = t.contiguous()
        out[name] = full.to(dtype) if full.is_floating_point() else full
        done[id(t)] = name
    return out


# ------------------------------------------------------------------------------ what goes around the weights


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ExportError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: not a run config (top level is not a mapping)")
    return data


def _hf_dirs(run_dir: Path, stage: int) -> list[Path]:
    """The stage's own ``hf`` export first, then other stages' (same architecture, other weights)."""
    others = [n for n in reversed(rundir.stages(run_dir)) if n != stage]
    return [d for n in [stage, *others] if rundir.is_hf_dir(d := rundir.hf_dir(run_dir, n))]


def _auto_dtype(run_dir: Path, hf_dirs: list[Path]) -> torch.dtype:
    """The training precision (the 16-bit copy for bf16/fp16 runs, as the stage export holds).

    The run's ``ds_config.json`` decides: it is what the engine ran with. A stage export's
    ``config.json`` only serves when it is missing.
    """
    ds = run_dir / rundir.DS_CONFIG_FILE
    if ds.is_file():
        cfg = json.loads(ds.read_text())
        for key, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if (cfg.get(key) or {}).get("enabled") is True:
                return dt
        return torch.float32
    if hf_dirs:
        raw = json.loads((hf_dirs[0] / rundir.HF_CONFIG_FILE).read_text())
        name = str(raw.get("dtype") or raw.get("torch_dtype") or "float32")
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)
    return torch.float32


def _model_config(run_cfg: dict[str, Any], hf_dirs: list[Path], vocab_rows: int, dtype: torch.dtype):
    """HF config from a stage's ``hf/config.json``, else rebuilt the way ``build_base_model`` built it."""
    m = run_cfg.get("model") or {}
    if hf_dirs:
        config = AutoConfig.from_pretrained(hf_dirs[0])
    elif m.get("name_or_path"):
        kwargs = {"gguf_file": m["gguf_file"]} if m.get("gguf_file") else {}
        try:
            config = AutoConfig.from_pretrained(
                m["name_or_path"], trust_remote_code=bool(m.get("trust_remote_code")), **kwargs
            )
        except OSError as e:
            raise ExportError(
                f"no stage hf/config.json and model.name_or_path {m['name_or_path']!r} cannot be loaded: {e}"
            ) from None
    elif m.get("init"):
        config = LlamaConfig(**m["init"], attn_implementation=m.get("attn_implementation", "sdpa"))
    else:
        raise ExportError(
            "cannot rebuild the model config: no stage hf/config.json and the run config has "
            "neither model.name_or_path nor model.init"
        )
    config.vocab_size = vocab_rows  # the trained embedding is authoritative (<thinking> was added)
    config.dtype = dtype
    return config


def _tokenizer(run_dir: Path, run_cfg: dict[str, Any], hf_dirs: list[Path], rows: int) -> tuple[Any, int]:
    """The tokenizer the model was trained with, ``<thinking>`` at the id the weights learned."""
    m = run_cfg.get("model") or {}
    thinking = m.get("thinking_token", "<thinking>")
    if hf_dirs:  # saved after <thinking> was added: exactly the training tokenizer
        where: Any = hf_dirs[0]
        tok = load_tokenizer(str(where))
    elif (
        run_dir / rundir.TOKENIZER_DIR / "tokenizer_config.json"
    ).is_file():  # trained sentencepiece, pre-<thinking>
        where = run_dir / rundir.TOKENIZER_DIR
        tok = load_tokenizer(str(where))
    elif m.get("tokenizer") not in (None, "sentencepiece") or m.get("name_or_path"):
        where = m.get("tokenizer") or m["name_or_path"]
        gguf = m.get("gguf_file") if where == m.get("name_or_path") else None
        try:
            kwargs = {"gguf_file": gguf} if gguf else {}
            tok = load_tokenizer(where, trust_remote_code=bool(m.get("trust_remote_code")), **kwargs)
        except OSError as e:
            raise ExportError(f"cannot load the tokenizer {where!r}: {e}") from None
    else:
        raise ExportError(f"no tokenizer: neither a stage hf dir nor {run_dir / 'tokenizer'} exists")
    # Same call as training (run_setup.prepare_data): a no-op when present, else the next id.
    thinking_id = int(add_thinking_token(tok, thinking))
    recorded = hf_dirs[0] / rundir.LATENT_META_FILE if hf_dirs else None
    want = rundir.read_meta(hf_dirs[0]).get("thinking_token_id") if hf_dirs else None
    if want not in (None, thinking_id) or not 0 <= thinking_id < rows:
        raise ExportError(
            f"tokenizer from {where} puts {thinking} at id {thinking_id}, but the checkpoint has "
            f"{rows} embedding rows" + (f" and {recorded} says {want}" if want is not None else "")
        )
    return tok, thinking_id


def _stage_latent(run_cfg: dict[str, Any], run_dir: Path, stage: int, hf_dirs: list[Path]) -> dict[str, Any]:
    """mode/alpha/temperature/top_p of stage N: the run config, else the stage's own hf export."""
    stages = run_cfg.get("stages") or []
    if 1 <= stage <= len(stages):
        st = StageConfig(
            **{k: v for k, v in stages[stage - 1].items() if k in ("mode", "alpha", "temperature", "top_p")}
        )
        return {
            "mode": st.mode,
            "alpha": float(st.alpha),
            "temperature": float(st.temperature),
            "top_p": float(st.top_p),
        }
    own = rundir.hf_dir(run_dir, stage)
    if hf_dirs and hf_dirs[0] == own and (meta := rundir.read_meta(own)):
        return {k: meta[k] for k in ("mode", "alpha", "temperature", "top_p")}
    raise ExportError(f"stage {stage} is not in {run_dir / rundir.CONFIG_FILE} (it has {len(stages)} stages)")


def _check_output(output: Path, ckpt_dir: Path) -> None:
    """``save_latent_model`` replaces ``output`` wholesale: only ever replace an earlier export."""
    if output.is_file():
        raise ExportError(f"--output {output} is a file")
    if output.is_dir() and any(output.iterdir()) and not (output / rundir.LATENT_META_FILE).is_file():
        raise ExportError(
            f"--output {output} exists and is not an earlier export (no {rundir.LATENT_META_FILE}); "
            "refusing to replace it"
        )
    out, src = output.resolve(), ckpt_dir.resolve()
    if src == out or src.is_relative_to(out):
        raise ExportError(f"--output {output} would replace the checkpoint {ckpt_dir} it is exported from")


# ------------------------------------------------------------------------------ the export


def export_checkpoint(
    ckpt_root: Path, tag: str | None, output: Path, *, run_dir: Path, stage: int, dtype: str = "auto"
) -> Path:
    """Consolidate ``ckpt_root/<tag>`` (``None``: the one ``latest`` names) into an HF dir at ``output``.

    ``dtype``: ``auto`` (the training precision, so the result equals the stage export) or one of
    ``fp32``/``bf16``/``fp16``. Returns ``output``. Raises :class:`ExportError` for user errors.
    """
    ckpt_root, output, run_dir = Path(ckpt_root), Path(output).expanduser(), Path(run_dir)
    ckpt_dir = _checkpoint_dir(ckpt_root, tag)
    _check_output(output, ckpt_dir)
    cfg_file = run_dir / rundir.CONFIG_FILE
    run_cfg = _read_yaml(cfg_file) if cfg_file.is_file() else {}
    hf_dirs = _hf_dirs(run_dir, stage)
    if not run_cfg and not hf_dirs:
        raise ExportError(
            f"{cfg_file} does not exist and no stage has an hf export: cannot tell the model config"
        )
    if dtype != "auto" and dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype!r} not in auto|{'|'.join(EXPORT_DTYPES)}")
    torch_dtype = _auto_dtype(run_dir, hf_dirs) if dtype == "auto" else DTYPES[dtype]
    train_state_file = ckpt_dir / TRAIN_STATE_FILE
    train_state = json.loads(train_state_file.read_text()) if train_state_file.is_file() else {}
    if train_state.get("stage") not in (None, stage):
        raise ExportError(
            f"{train_state_file} says stage {train_state['stage']}, but the checkpoint is under stage {stage}"
        )

    state = consolidate(ckpt_dir, torch_dtype)
    rows = next(
        (v.shape[0] for k, v in state.items() if k.startswith("base.") and k.endswith(_EMBEDDINGS)), None
    )
    if rows is None:
        raise ExportError(
            f"{ckpt_dir} holds no LatentLM weights (no base.* input embedding after consolidation)"
        )
    tokenizer, thinking_id = _tokenizer(run_dir, run_cfg, hf_dirs, rows)
    latent = _stage_latent(run_cfg, run_dir, stage, hf_dirs)
    if train_state.get("mode") not in (None, latent["mode"]):
        log.warning(
            "%s: mode %r, run config: %r (used)", train_state_file, train_state["mode"], latent["mode"]
        )
    up = state.get("adapter.up.weight")
    source = {"checkpoint": str(ckpt_dir.resolve()), "tag": ckpt_dir.name, "stage": stage}
    source.update({k: train_state.get(k) for k in ("step_in_stage", "global_step", "stage_complete")})
    source.update(dtype=str(torch_dtype).removeprefix("torch."), via="zero_to_fp32")
    hidden = int(up.shape[0]) if up is not None else None
    latent = rundir.latent_meta(
        **latent, thinking_token_id=thinking_id, adapter=up is not None, adapter_hidden=hidden, source=source
    )
    config = _model_config(run_cfg, hf_dirs, int(rows), torch_dtype)
    log.info(
        "exporting %s (stage %d, %s, %s) -> %s", ckpt_dir, stage, latent["mode"], source["dtype"], output
    )
    try:
        return save_latent_model(
            output, config=config, latent_state=state, tokenizer=tokenizer, latent_config=latent
        )
    except RuntimeError as e:  # the weights do not fit the config: a foreign or mismatched checkpoint
        raise ExportError(f"{ckpt_dir}: {e}") from None
