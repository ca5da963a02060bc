"""``ltscale plan``: what a run needs per GPU, and how long it takes, before it is submitted.

Pure arithmetic on the run config, the model's architecture (its HF ``config.json``) and the
DeepSpeed templates' knobs; nothing is allocated and DeepSpeed is not imported. Every number is
an estimate with its assumptions in the output; bench/RESULTS.md ("Planner") compares the
model-state part with DeepSpeed's own estimator and the totals with measured CPU steps.

Per GPU, for ``W`` ranks, ``P`` parameters (padded vocabulary rows and adapter included), ``b``
bytes per 16-bit value (4 when the run is fp32):

* **model states** (``model_states``): the 16-bit parameter and gradient shards (``b P/W`` each),
  the fp32 master copy and Adam's two moments (``12 P/W``), and the fp32 gradient ZeRO-3 builds one
  optimizer sub-group at a time (``4 min(P/W, sub_group_size)``; ZeRO-2: the whole shard). ZeRO-2
  keeps the 16-bit parameters whole (``b P``); ``zero3_offload`` moves the fp32 parts to host memory.
* **gathered weights**: ZeRO-3 keeps a gathered parameter until the parameters used before its next
  use exceed ``stage3_max_reuse_distance``. With the multi-pass rollout every layer is reused, so a
  reuse distance above ``P`` (ltscale's zero3 template) holds a full 16-bit copy (``b P``) for the
  whole step; a smaller one (the offload template) holds about that many elements plus one prefetch
  bucket. ZeRO-2 has no gather.
* **activations** (:func:`activation_memory`) of one micro-batch at the stage's pass count, with
  and without ``model.gradient_checkpointing`` (per-pass recompute: it drops the K/V history the
  later passes saved, but the largest pass is recomputed whole during its backward).
* **buffers**: DeepSpeed's reduce and prefetch buckets (16-bit).

Step time: per pass ``max(FLOPs / (peak x MFU), weight bytes / HBM bandwidth)`` (small late passes
are bound by reading the weights), forward + backward (+ recompute), plus the optimizer update and
the collectives (ring, no overlap assumed: an upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass

from ltscale.batching import batch_layout, stage_steps
from ltscale.config import RunConfig
from ltscale.model import memory

GIB = 1024**3
STRATEGIES = ("zero2", "zero3", "zero3_offload")
# bf16 dense peak FLOP/s, HBM bytes/s, memory bytes (vendor datasheets; memory as nvidia-smi reports it)
GPUS = {
    "a100": (312e12, 2.039e12, 81920 * 2**20),
    "h100": (989e12, 3.35e12, 81559 * 2**20),
    "h200": (989e12, 4.8e12, 143771 * 2**20),
}


@dataclass(frozen=True)
class Arch:
    """The shapes that set memory and FLOPs (a Llama-style decoder)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab_rows: int  # embedding rows after ``<thinking>`` and padding
    tied: bool
    adapter_hidden: int = 0

    @property
    def layer_params(self) -> int:
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * d * q + 2 * d * kv + 3 * d * self.ffn + 2 * d

    @property
    def params(self) -> int:
        a = self.adapter_hidden
        adapter = 2 * self.hidden * a + a + 3 * self.hidden if a else 0
        embed = self.vocab_rows * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params + embed + self.hidden + adapter

    @property
    def matmul_params(self) -> int:
        """Weights one token multiplies by (decoder layers and the LM head): 2 FLOPs each, forward."""
        return self.layers * (self.layer_params - 2 * self.hidden) + self.vocab_rows * self.hidden


@dataclass(frozen=True)
class Hardware:
    nodes: int
    gpus_per_node: int
    memory: int  # bytes per GPU
    peak_flops: float = GPUS["a100"][0]
    hbm_bw: float = GPUS["a100"][1]
    mfu: float = 0.4
    intra_bw: float = 200e9  # bytes/s per GPU inside a node (NVLink ring bus bandwidth)
    inter_bw: float = 25e9  # bytes/s per GPU across nodes (one 200 Gb/s NIC per GPU)
    headroom: float = 0.1  # CUDA context, NCCL buffers, allocator fragmentation

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable(self) -> float:
        return self.memory * (1.0 - self.headroom)


# ------------------------------------------------------------------------------- activations
# Bytes kept for backward per token: ltscale/model/memory.py's formula (derived there, checked per
# layer by bench/activation_memory.py); the backward transients below were measured against real
# CPU steps by bench/plan_validation.py.


def memory_shape(arch: Arch) -> dict[str, int]:
    """The HF config keys ``model.memory`` reads, for this architecture."""
    return {"hidden_size": arch.hidden, "intermediate_size": arch.ffn, "num_attention_heads": arch.heads,
            "num_key_value_heads": arch.kv_heads, "head_dim": arch.head_dim, "num_hidden_layers": arch.layers,
            "vocab_size": arch.vocab_rows}  # fmt: skip


def layer_bytes_per_token(arch: Arch, b: int, *, keys_per_token: float = 1.0) -> float:
    """One decoder layer, no checkpointing (``model.memory.layer_bytes_per_token``); ``keys_per_token``
    = key slots the step's passes gather per token (1: a single pass over unpadded rows)."""
    return memory.layer_bytes_per_token(memory_shape(arch), dtype_bytes=b, checkpointing=False,
                                        keys_per_token=keys_per_token)  # fmt: skip


def activation_memory(
    arch: Arch,
    *,
    b: int,
    rows: int,
    row_tokens: int,
    passes: int,
    fusion_latents: int,
    checkpointing: bool,
    history_span: float = 1.0,
    largest_pass: float = 1.0,
) -> dict[str, float]:
    """Peak activation bytes of one micro-batch (``rows`` x ``row_tokens``, latents included).

    ``history_span``: the key slots the latent passes gather (each pass: every row up to the longest
    row's extent so far), per token and per latent pass; pass 0 is counted as one key per token (it
    covers at most every token). 1.0 (every latent at the row's end) is the worst case and the default.
    ``largest_pass``: the largest pass's share of the tokens, what checkpointing recomputes at once
    (1.0, a batch whose rows hold no latent, is the worst case and the default). ``fusion_latents``: latent slots filled by fusion (their full-vocabulary
    softmax, sort and mixture).

    Backward adds the logits' gradient and, while a layer is back-propagated, gradients the size of
    its activations (counted twice: one layer's input and output gradients). With checkpointing the
    largest pass is recomputed whole (worst case: every token) while those are alive; measured on
    CPU, the recompute does not reuse the freed logits gradient, so the two add up.
    """
    n = rows * row_tokens
    shape = memory_shape(arch)
    one_pass = layer_bytes_per_token(arch, b)  # pass 0's own keys: one per token
    keys = 1.0 + (passes - 1) * history_span  # + each later pass gathers its rows' keys so far
    masks = arch.heads // arch.kv_heads * row_tokens  # each pass's mask: G query rows per key slot
    fixed = {mode: memory.fixed_bytes_per_token(shape, dtype_bytes=b, checkpointing=checkpointing, mode=mode,
                                                latent_fraction=fusion_latents / n, mask_elems_per_token=masks)
             for mode in ("cot", "fusion")}  # fmt: skip
    layers = arch.layers * n * one_pass
    out = {
        "head": n * fixed["cot"],
        "fusion": n * (fixed["fusion"] - fixed["cot"]),
        "logits_grad": n * 6.0 * arch.vocab_rows,  # fp32 + 16-bit, at the start of backward
        "layer_grads": 2.0 * n * one_pass,
    }
    if checkpointing:
        kept = arch.layers * n * memory.layer_bytes_per_token(shape, dtype_bytes=b, checkpointing=True,
                                                              kv_held_fraction=1.0 if passes > 1 else 0.0)  # fmt: skip
        out.update(layers=kept, history=0.0, recompute=largest_pass * layers)
    else:
        history = arch.layers * n * (layer_bytes_per_token(arch, b, keys_per_token=keys) - one_pass)
        out.update(layers=layers, history=history, recompute=0.0)
    out["total"] = sum(out[k] for k in ("head", "fusion", "logits_grad", "layer_grads", "layers", "history",
                                        "recompute"))  # fmt: skip
    return out


# ------------------------------------------------------------------------------- model states


def zero_knobs(name: str) -> dict:
    """The ZeRO section of a DeepSpeed template (``ds_configs/<name>.json``)."""
    from ltscale.engine.ds_config import load_template

    return load_template(name).get("zero_optimization") or {}


def model_states(arch: Arch, strategy: str, world: int, b: int) -> dict[str, float]:
    """Per-GPU bytes of parameters, gradients, optimizer state, gathered copy and buckets."""
    z = zero_knobs(strategy)
    p, stage = arch.params, int(z.get("stage", 0))
    offload = str((z.get("offload_optimizer") or {}).get("device", "none")) in ("cpu", "nvme")
    shard = p / world
    # ZeRO-3 converts the gradient to fp32 one optimizer sub-group at a time; ZeRO-2 the whole shard
    fp32 = 12 * shard + 4 * (min(shard, float(z.get("sub_group_size", 1e9))) if stage == 3 else shard)
    out = {"params16": b * (shard if stage == 3 else p), "grads16": b * shard,
           "optimizer": 0.0 if offload else fp32, "host_optimizer": fp32 if offload else 0.0}  # fmt: skip
    if stage == 3:
        reuse = float(z.get("stage3_max_reuse_distance", 1e9))
        kept = p if reuse >= p else reuse + float(z.get("stage3_prefetch_bucket_size", 5e7))
        out["gathered"] = b * min(p, kept)
        out["buckets"] = b * (
            2 * min(p, float(z.get("reduce_bucket_size", 5e8)))
            + min(p, float(z.get("stage3_prefetch_bucket_size", 5e7)))
        )
    else:
        out["gathered"] = 0.0
        out["buckets"] = b * (
            2 * min(p, float(z.get("reduce_bucket_size", 5e8)))
            + min(p, float(z.get("allgather_bucket_size", 5e8)))
        )
    out["total"] = sum(v for k, v in out.items() if k != "host_optimizer")
    return out


# ------------------------------------------------------------------------------- stages and time


@dataclass(frozen=True)
class StageLoad:
    index: int
    mode: str
    epochs: float
    steps: int
    passes: int  # sequential passes per step (1 + the most latent slots a row holds, rollout modes)
    latents: int  # the most latent slots per row


def stage_loads(cfg: RunConfig, n_examples: int, world: int) -> list[StageLoad]:
    """``cfg``: resolved for ``world`` ranks (``batching.resolve_batch``)."""
    from ltscale.methods import get_method

    method = get_method(cfg.method)
    out = []
    for i, (st, steps) in enumerate(zip(cfg.stages, stage_steps(cfg, n_examples, world), strict=True), 1):
        slots = method.latent_slots(cfg, i)
        out.append(
            StageLoad(
                i, st.mode, st.epochs, steps, 1 + slots if st.mode in ("hidden", "fusion") else 1, slots
            )
        )
    return out


def step_seconds(
    arch: Arch,
    hw: Hardware,
    strategy: str,
    *,
    b: int,
    micro: int,
    accum: int,
    row_tokens: int,
    passes: int,
    checkpointing: bool,
    first_pass_share: float = 0.5,
) -> dict[str, float]:
    """One optimizer step: compute, the optimizer update and the collectives (see module docstring).

    ``first_pass_share``: the tokens pass 0 computes (everything before each row's first latent);
    the other passes split the rest evenly.
    """
    fb = 4 if checkpointing else 3  # forward + backward (2x) + recompute
    n = micro * row_tokens
    attention = 4 * arch.layers * arch.heads * arch.head_dim * row_tokens / 2  # QK^T and AV over earlier keys
    compute = (2 * arch.matmul_params + attention) * fb * n / (hw.peak_flops * hw.mfu)
    reads = (
        b * arch.layers * arch.layer_params * (fb - 1) / hw.hbm_bw
    )  # weights per pass, fwd + bwd (+ recompute)
    shares = (
        [1.0] if passes == 1 else [first_pass_share] + [(1 - first_pass_share) / (passes - 1)] * (passes - 1)
    )
    micro_s = sum(max(compute * s, reads) for s in shares)
    z = zero_knobs(strategy)
    shard = arch.params / hw.world
    if (z.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme"):
        # CPU Adam at ~0.5 G params/s per rank, gradients down and parameters up over PCIe (~25 GB/s)
        optimizer = shard / 5e8 + (4 + b) * shard / 25e9
    else:
        optimizer = 2 * 18 * shard / hw.hbm_bw  # read and write master, moments, gradient
    bw = hw.intra_bw if hw.nodes == 1 else hw.inter_bw
    ring = (hw.world - 1) / hw.world / bw if hw.world > 1 else 0.0
    weights = b * arch.params
    if int(z.get("stage", 0)) == 3:
        whole = float(z.get("stage3_max_reuse_distance", 1e9)) >= arch.params
        gathers = 1 if whole else 2 * passes  # once per micro-step, or per pass forward and backward
        comm = accum * (gathers + 1) * weights * ring  # + the gradient reduce-scatter
    else:
        comm = (accum + 1) * weights * ring  # gradient reductions + the parameter all-gather after the step
    total = accum * micro_s + optimizer + comm
    return {"compute": accum * micro_s, "optimizer": optimizer, "comm": comm, "total": total}


# ------------------------------------------------------------------------------- the plan


@dataclass
class Option:
    strategy: str
    checkpointing: bool
    micro: int
    accum: int
    states: dict[str, float]
    activations: dict[str, float]  # of the worst stage
    peak: float  # bytes per GPU, worst stage
    step_s: list[float]  # per stage
    hours: float  # all stages

    def knobs(self) -> str:
        return (
            f"engine.ds_config={self.strategy} model.gradient_checkpointing={str(self.checkpointing).lower()} "
            f"train.micro_batch_size={self.micro}"
        )


@dataclass
class Plan:
    arch: Arch
    hw: Hardware
    b: int
    seq_len: int
    mean_tokens: int
    examples: int
    stages: list[StageLoad]
    options: list[Option]  # at the configured micro-batch
    configured: Option
    recommended: Option | None  # the fastest that fits, over micro-batches that keep the global batch


def dtype_bytes(cfg: RunConfig) -> int:
    """16-bit unless the run trains in fp32 (``auto`` plans for a GPU, where it means bf16)."""
    prec = cfg.engine.precision if cfg.engine.precision != "auto" else cfg.model.dtype
    return 4 if prec in ("fp32", "fp64") else 2


@dataclass(frozen=True)
class Workload:
    """The data side of a plan: the longest row (memory), the mean row (time), the examples per
    epoch (steps) and :func:`activation_memory`'s ``history_span``."""

    seq_len: int
    mean_tokens: int
    examples: int
    history_span: float


def options_for(
    cfg: RunConfig, arch: Arch, hw: Hardware, work: Workload
) -> tuple[list[StageLoad], list[Option]]:
    """Every (strategy, checkpointing) pair for ``cfg`` (as written) on ``hw``."""
    from ltscale.batching import resolve_batch

    layout = batch_layout(cfg.train, hw.world)
    stages = stage_loads(resolve_batch(cfg, hw.world, quiet=True), work.examples, hw.world)
    b = dtype_bytes(cfg)
    out = []
    for strategy in STRATEGIES:
        states = model_states(arch, strategy, hw.world, b)
        for ckpt in (False, True):
            acts = [activation_memory(arch, b=b, rows=layout.micro, row_tokens=work.seq_len + s.latents, passes=s.passes,
                                      fusion_latents=layout.micro * s.latents if s.mode == "fusion" else 0,
                                      checkpointing=ckpt, history_span=work.history_span) for s in stages]  # fmt: skip
            worst = max(acts, key=lambda a: a["total"])
            times = [step_seconds(arch, hw, strategy, b=b, micro=layout.micro, accum=layout.accum,
                                  row_tokens=work.mean_tokens + s.latents, passes=s.passes, checkpointing=ckpt)["total"]
                     for s in stages]  # fmt: skip
            hours = sum(t * s.steps for t, s in zip(times, stages, strict=True)) / 3600
            out.append(Option(strategy, ckpt, layout.micro, layout.accum, states, worst,
                              states["total"] + worst["total"], times, hours))  # fmt: skip
    return stages, out


def evaluate(
    cfg: RunConfig,
    arch: Arch,
    hw: Hardware,
    *,
    seq_len: int,
    mean_tokens: int,
    examples: int,
    history_span: float = 1.0,
) -> Plan:
    """The configured run's options, and the fastest option that fits over every micro-batch that
    keeps the global batch (``train.micro_batch_size`` is then only a cap, see ``batching``)."""
    import dataclasses

    work = Workload(seq_len, mean_tokens, examples, history_span)
    stages, options = options_for(cfg, arch, hw, work)
    configured = next(
        o
        for o in options
        if (o.strategy, o.checkpointing) == (cfg.engine.ds_config, cfg.model.gradient_checkpointing)
    )
    layout = batch_layout(cfg.train, hw.world)
    candidates = list(options)
    for m in range(layout.micro - 1, 0, -1):
        train = dataclasses.replace(
            cfg.train, micro_batch_size=m, grad_accum=1, global_batch_size=layout.global_batch
        )
        if batch_layout(train, hw.world).micro == m:
            candidates += options_for(dataclasses.replace(cfg, train=train), arch, hw, work)[1]
    fits = [o for o in candidates if o.peak <= hw.usable]
    pick = min(fits, key=lambda o: (round(o.hours, 1), -o.micro, STRATEGIES.index(o.strategy)), default=None)
    return Plan(arch, hw, dtype_bytes(cfg), seq_len, mean_tokens, examples, stages, options, configured, pick)
