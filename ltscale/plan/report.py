"""``ltscale plan``'s inputs (architecture, training-set size, memory sizes) and its text report.

The arithmetic is in ``ltscale/plan/estimate.py``; this module reads what it needs from the run
config, the model's ``config.json`` and the data, and prints the result.
"""

from __future__ import annotations

from pathlib import Path

from ltscale.config import ConfigError, RunConfig
from ltscale.plan.estimate import GIB, GPUS, STRATEGIES, Arch, Hardware, Plan, evaluate

# Training-set sizes of hub sources the planner cannot count offline.
KNOWN_SIZES = {"whynlp/gsm8k-aug": 385_620}


# ------------------------------------------------------------------------------- inputs


def load_arch(cfg: RunConfig, model_config: str | Path | None = None) -> Arch:
    """The architecture: ``model_config`` (a dir or config.json), else ``model.init`` (a model built from
    scratch), else the config of ``model.name_or_path`` (hub name: needs the network; GGUF: read locally)."""
    from transformers import AutoConfig, LlamaConfig

    from ltscale.methods import get_method
    from ltscale.model.builder import padded_rows, resolve_pretrained_source

    m = cfg.model
    if model_config is not None:
        path = Path(model_config)
        hf = AutoConfig.from_pretrained(path.parent if path.is_file() else path)
    elif m.name_or_path is None:
        hf = LlamaConfig(**m.init)
    else:
        source, gguf = resolve_pretrained_source(m.name_or_path, m.gguf_file)
        kwargs = {"gguf_file": gguf} if gguf else {}
        hf = AutoConfig.from_pretrained(source, trust_remote_code=m.trust_remote_code, **kwargs)
    text = hf.get_text_config()
    # a model built from scratch gets the trained tokenizer's size: at most its pieces + 256 bytes
    tokens = (
        m.tokenizer_vocab_size + 256 if m.name_or_path is None and model_config is None else text.vocab_size
    )
    tokens += 1 + len(get_method(cfg.method).extra_tokens(cfg))  # <thinking> and the method's markers
    heads = text.num_attention_heads
    return Arch(
        name=Path(str(model_config or m.name_or_path or "model.init")).name, hidden=text.hidden_size,
        layers=text.num_hidden_layers, heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, ffn=text.intermediate_size,
        vocab_rows=padded_rows(max(tokens, text.vocab_size), m.pad_vocab_to_multiple_of),
        tied=bool(getattr(hf, "tie_word_embeddings", False)), adapter_hidden=m.adapter_hidden if m.adapter else 0,
    )  # fmt: skip


def count_examples(cfg: RunConfig) -> int | None:
    """Training examples: synthetic count, a known hub size, or the lines of a local JSONL; None if unknown."""
    d = cfg.data
    n: int | None = None
    if d.train == "synthetic":
        n = d.synthetic.n_train
    elif d.train in KNOWN_SIZES:
        n = KNOWN_SIZES[d.train]
    else:
        path = Path(d.train).expanduser()
        if path.is_dir():
            path = path / f"{d.train_split or 'train'}.jsonl"
        if path.is_file() and path.suffix == ".jsonl":
            with path.open("rb") as f:
                n = sum(1 for line in f if line.strip())
    return min(n, d.train_limit) if n is not None and d.train_limit else n


def parse_memory(text: str) -> int:
    """``80GB`` / ``80G`` / ``80GiB`` -> bytes. GPU memory is sold in binary units (an "80GB" A100
    has 80 GiB), so GB means GiB here; ``MB`` likewise."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"G": GIB, "M": 2**20, "T": 2**40}.get(t[-1:])
    try:
        value = float(t[:-1] if scale else t)
    except ValueError:
        raise ConfigError(f"--gpu-memory: {text!r} is not a size such as 80GB") from None
    if value <= 0:
        raise ConfigError(f"--gpu-memory: {text!r} must be positive")
    return int(value * (scale or GIB))


# ------------------------------------------------------------------------------- report


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def format_plan(p: Plan, source: str) -> str:
    a, hw = p.arch, p.hw
    lines = [
        f"ltscale plan: {source}",
        f"hardware  {hw.nodes} node(s) x {hw.gpus_per_node} GPUs = {hw.world} ranks, {_gib(hw.memory)} GiB each "
        f"({_gib(hw.usable)} GiB usable: {hw.headroom:.0%} kept for CUDA context, NCCL and fragmentation); "
        f"{hw.peak_flops / 1e12:.0f} TFLOP/s at MFU {hw.mfu:.2f}, HBM {hw.hbm_bw / 1e12:.2f} TB/s, "
        f"collectives {(hw.intra_bw if hw.nodes == 1 else hw.inter_bw) / 1e9:.0f} GB/s per GPU",
        f"model     {a.name}: {a.params / 1e9:.2f} B parameters, d {a.hidden}, {a.layers} layers, {a.heads}/{a.kv_heads} "
        f"heads, d_ff {a.ffn}, vocabulary {a.vocab_rows:,} rows ({'tied' if a.tied else 'untied'})"
        + (f", adapter {a.adapter_hidden}" if a.adapter_hidden else "")
        + f"; {8 * p.b}-bit weights",
        f"batch     global {p.configured.micro * p.configured.accum * hw.world} = micro-batch {p.configured.micro} x "
        f"accumulation {p.configured.accum} x "
        f"{hw.world} ranks; memory sized at {p.seq_len} tokens per row + its latents, time at {p.mean_tokens}",
        f"data      {p.examples:,} training examples",
        "",
        "stage  mode     epochs    steps  passes  latents/row",
    ]
    lines += [
        f"{s.index:<6} {s.mode:<8} {s.epochs:<7g} {s.steps:>7,}  {s.passes:>6}  {s.latents:>11}"
        for s in p.stages
    ]
    by = {(o.strategy, o.checkpointing): o for o in p.options}
    head = f"{'':34}" + "".join(f"{s:>15}" for s in STRATEGIES)
    rows = [("16-bit parameters", "params16"), ("16-bit gradient shard", "grads16"),
            ("fp32 master + Adam + fp32 grad", "optimizer"), ("gathered 16-bit weights", "gathered"),
            ("DeepSpeed buckets", "buckets")]  # fmt: skip
    lines += ["", "per-GPU memory, GiB (worst stage; history of latent passes at its worst: every latent at the row's end)",
              head]  # fmt: skip
    lines += [
        f"{label:34}" + "".join(f"{_gib(by[s, False].states[k]):>15}" for s in STRATEGIES)
        for label, k in rows
    ]
    for ckpt in (False, True):
        tag = "ckpt" if ckpt else "no ckpt"
        acts = {s: by[s, ckpt].activations for s in STRATEGIES}
        lines.append(
            f"{'activations, ' + tag:34}" + "".join(f"{_gib(acts[s]['total']):>15}" for s in STRATEGIES)
        )
    for ckpt in (False, True):
        tag = "ckpt" if ckpt else "no ckpt"
        cells = "".join(f"{_gib(by[s, ckpt].peak) + (' ok' if by[s, ckpt].peak <= hw.usable else ' NO'):>15}"
                        for s in STRATEGIES)  # fmt: skip
        lines.append(f"{'total, ' + tag:34}" + cells)
    host = by["zero3_offload", False].states["host_optimizer"] * hw.gpus_per_node
    lines.append(f"{'host memory per node (offload)':34}{'':30}{_gib(host):>15}")
    act = by["zero3", False].activations
    lines.append(
        f"  (activations, no ckpt: layers {_gib(act['layers'])}, K/V history {_gib(act['history'])}, logits "
        f"{_gib(act['head'])} + gradient {_gib(act['logits_grad'])}, layer gradients {_gib(act['layer_grads'])}, "
        f"fusion {_gib(act['fusion'])})"
    )
    lines += ["", "step time, s (hours per stage), options that fit at this micro-batch"]
    for o in p.options:
        if o.peak <= hw.usable:
            cells = ", ".join(
                f"{t:.2f} ({t * s.steps / 3600:.1f} h)" for t, s in zip(o.step_s, p.stages, strict=True)
            )
            lines.append(
                f"  {o.strategy:<14} ckpt {'on ' if o.checkpointing else 'off'}  {cells}; total {o.hours:.1f} h"
            )
    c, r = p.configured, p.recommended
    verdict = "fits" if c.peak <= hw.usable else "DOES NOT FIT"
    lines += [
        "",
        f"configured   {c.knobs()}: {_gib(c.peak)} of {_gib(hw.usable)} GiB, {verdict}, {c.hours:.1f} h",
    ]
    if r is not None:
        lines.append(f"recommended  {r.knobs()}: {_gib(r.peak)} GiB, {r.hours:.1f} h (the fastest that fits; "
                     f"global batch {r.micro * r.accum * hw.world}, accumulation {r.accum})")  # fmt: skip
    else:
        lines.append("will not fit even at micro-batch 1: use more GPUs (ZeRO-3 divides the model states by them), "
                     "GPUs with more memory, or a shorter data.max_length")  # fmt: skip
    lines.append(
        "assumptions: model states as DeepSpeed keeps them (fp32 master + Adam 12 B/param/rank, fp32 gradient of the "
        "shard (ZeRO-2) or of one sub-group (ZeRO-3)); step time assumes no overlap of "
        "communication and compute; passes after the first share half of the tokens; confidence scoring "
        "and evaluation time not included"
    )
    return "\n".join(lines)


def plan_run(
    cfg: RunConfig,
    *,
    nodes: int,
    gpus_per_node: int,
    gpu_memory: str | None = None,
    gpu: str = "a100",
    mfu: float = 0.4,
    seq_len: int | None = None,
    mean_tokens: int | None = None,
    examples: int | None = None,
    model_config: str | None = None,
) -> Plan:
    """``ltscale plan``'s computation: defaults from the config (``data.max_length``, the training-set size)."""
    if gpu not in GPUS:
        raise ConfigError(f"--gpu: {gpu!r} is not one of {', '.join(GPUS)}")
    if nodes < 1 or gpus_per_node < 1 or not 0 < mfu <= 1:
        raise ConfigError(
            f"--nodes {nodes} / --gpus-per-node {gpus_per_node} must be >= 1, --mfu {mfu} in (0, 1]"
        )
    peak, hbm, memory = GPUS[gpu]
    hw = Hardware(nodes, gpus_per_node, parse_memory(gpu_memory) if gpu_memory else memory, peak, hbm, mfu)
    examples = examples or count_examples(cfg)
    if examples is None:
        raise ConfigError(
            f"data.train: cannot count the examples of {cfg.data.train!r} offline; pass --examples N"
        )
    seq = seq_len or cfg.data.max_length
    return evaluate(cfg, load_arch(cfg, model_config), hw, seq_len=seq, mean_tokens=mean_tokens or seq // 2,
                    examples=examples)  # fmt: skip
