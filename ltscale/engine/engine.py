"""Building the DeepSpeed engine, and the few ZeRO-aware accessors the trainer and tests need.

Why a wrapper: the trainer must not know whether parameters are partitioned. Everything that
behaves differently under ZeRO-3 (external parameters, consolidated state dicts, full gradients)
is decided here from the rendered DeepSpeed config.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .dist import dist_info, init_distributed
from .ds_config import zero_stage

if TYPE_CHECKING:  # pragma: no cover
    from deepspeed import DeepSpeedEngine

log = logging.getLogger(__name__)

__all__ = [
    "ModelConstruction",
    "adamw_param_groups",
    "build_engine",
    "count_parameters",
    "gather_state_dict",
    "full_grad",
    "grad_norm",
    "is_zero3",
    "local_grads_finite",
    "step_unless_nonfinite",
]


class ModelConstruction:
    """How the trainer's model is built for the engine that will train it.

    Under ZeRO-3, :meth:`building` keeps a transformers ``HfDeepSpeedConfig`` alive, so that
    ``from_config``/``from_pretrained`` construct the model inside ``deepspeed.zero.Init``: every
    parameter is partitioned over the ranks as it is created (in the DeepSpeed config's precision),
    a random init runs one gathered module at a time, and pretrained weights are read by rank 0
    and scattered module by module. No rank holds the whole model, where building it first and
    letting ``deepspeed.initialize`` partition it would put a full copy on every rank (8B in bf16:
    16 GB per rank, 128 GB per 8-GPU node). The config object lives only for the construction:
    while it exists transformers builds *every* model partitioned, including the evaluation
    model loaded later in the same process.

    :meth:`gathered` is what in-place edits of constructed weights (the ``<thinking>`` rows) run
    inside: the full parameters on every rank, and on exit rank 0's values partitioned again. Every
    rank must make the same calls (collective). Outside ZeRO-3 both are no-ops.
    """

    def __init__(self, ds_config: dict[str, Any]):
        self.ds_config = ds_config
        self.zero3 = zero_stage(ds_config) == 3

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        if not self.zero3:
            yield
            return
        init_distributed()
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        keep = HfDeepSpeedConfig(copy.deepcopy(self.ds_config))  # noqa: F841 - held by a weakref in transformers
        try:
            yield
        finally:
            unset_hf_deepspeed_config()

    def gathered(self, params: Iterable[nn.Parameter]) -> contextlib.AbstractContextManager:
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay on >=2-D weights, none on biases, norms and embeddings.

    Why: decaying norm gains and biases pulls them towards 0 (not towards their init of 1 / 0
    meaning), which only hurts; embeddings (and an lm_head tied to them) are excluded as in
    GPT-2/nanoGPT/Megatron practice, because rows of rare tokens receive almost no gradient and
    would otherwise just shrink. Tied parameters appear once. Frozen parameters are skipped.
    Empty groups are dropped (DeepSpeed drops them too, but a LambdaLR built on the list would
    then see a different number of groups).
    """
    embedding_ids = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # ZeRO-3 may already have partitioned p (zero.Init): its real shape is p.ds_shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _offloads_optimizer(cfg: dict[str, Any]) -> bool:
    off = (cfg.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return str(off.get("device", "none")).lower() in ("cpu", "nvme")


def _lambda_lr_factory(fn: Callable[[int], float]) -> Callable[[torch.optim.Optimizer], Any]:
    """DeepSpeed calls this with the client optimizer, whose param_groups ZeRO keeps using."""

    def make(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=fn)

    return make


def build_engine(
    model: nn.Module,
    *,
    ds_config: dict[str, Any],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    scheduler: Callable[[int], float] | None = None,
    external_parameters: Sequence[tuple[nn.Module, nn.Parameter]] = (),
) -> DeepSpeedEngine:
    """Wrap ``model`` in a DeepSpeed engine with a client AdamW and an optional LambdaLR.

    * ``ds_config`` is a rendered config (``render_ds_config``); it must not carry
      ``optimizer``/``scheduler`` sections, since those would make DeepSpeed pick FusedAdam
      (a multi-minute JIT build on CPU) and fight the client optimizer.
    * The optimizer is ``torch.optim.AdamW`` (no JIT build), except with optimizer offload,
      where DeepSpeed refuses a torch optimizer and ``DeepSpeedCPUAdam`` (JIT-built once,
      cached in ``TORCH_EXTENSIONS_DIR``) is used.
    * ``scheduler(step) -> multiplier`` becomes a ``LambdaLR`` that DeepSpeed steps after
      every optimizer step and stores in its checkpoints; optimizer step ``i`` (0-based) runs
      with ``lr * scheduler(i)``.
    * ``external_parameters``: (module, param) pairs where ``module``'s forward reads
      ``param`` although another module owns it (the fusion reading the input-embedding
      matrix). Under ZeRO-3 they are registered with ``deepspeed.zero.register_external_parameter``
      so the parameter is gathered for that module's forward and backward; otherwise it would
      be an empty placeholder there. Ignored for stages < 3 (parameters are whole).
    """
    init_distributed()
    import deepspeed

    cfg = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ValueError(
                f"ds_config has a {key!r} section; ltscale passes a client optimizer and LR schedule, "
                f"remove {key!r} from the DeepSpeed template"
            )
    stage = zero_stage(cfg)
    if stage == 3:
        for module, param in external_parameters:
            if not isinstance(param, nn.Parameter):
                raise TypeError(
                    f"external parameter for {type(module).__name__} must be an nn.Parameter, got {type(param)}"
                )
            deepspeed.zero.register_external_parameter(module, param)
        if external_parameters:
            log.info("registered %d external parameter(s) for ZeRO-3", len(external_parameters))

    groups = adamw_param_groups(model, weight_decay)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    if _offloads_optimizer(cfg):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer: torch.optim.Optimizer = DeepSpeedCPUAdam(
            groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adamw_mode=True
        )
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    lr_factory = _lambda_lr_factory(scheduler) if scheduler is not None else None
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_factory, config=cfg
    )
    log.info(
        "DeepSpeed engine: zero stage %d, world %d, micro %d x accum %d, %s",
        stage,
        dist_info().world_size,
        engine.train_micro_batch_size_per_gpu(),
        engine.gradient_accumulation_steps(),
        type(engine.optimizer).__name__,
    )
    return engine


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, each counted once, at their full size also when ZeRO-3 has
    partitioned them (``ds_numel``)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += int(getattr(p, "ds_numel", p.numel()))
    return total


def is_zero3(engine: Any) -> bool:
    return bool(engine.zero_optimization_partition_weights())


def gather_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """Full (unpartitioned) state dict on rank 0, ``None`` on other ranks.

    Collective: every rank must call it. Keys are ``engine.module.state_dict()`` names
    (persistent buffers included, tied weights under both names). Values are CPU tensors in the
    module's dtype: fp32 for fp32 runs, the 16-bit training copy for bf16/fp16 runs (what an
    HF export wants; the fp32 master weights live in the optimizer / ``zero_to_fp32.py``).
    """
    if is_zero3(engine):
        # Gathers one module at a time (bounded memory) on all ranks, copies on rank 0.
        return engine._zero3_consolidated_16bit_state_dict()
    if not dist_info().is_main:
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in engine.module.state_dict().items()}


def full_grad(param: nn.Parameter) -> torch.Tensor | None:
    """The full gradient of a (possibly partitioned) parameter, after backward and before step.

    Collective under ZeRO-3 (all ranks must ask for the same parameters in the same order).
    """
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(param)


def grad_norm(engine: Any) -> float:
    """Global gradient 2-norm of the last optimizer step (before clipping); NaN if unknown yet."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return math.nan
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


# --------------------------------------------------------------------------- non-finite steps


def local_grads_finite(engine: Any) -> bool:
    """Whether this rank's (reduced, possibly partitioned) gradients of the current step are finite.

    ZeRO-3 keeps them in ``optimizer.averaged_gradients`` after each backward (param.grad is
    empty); other setups keep them in ``param.grad``. Under ZeRO-3 with optimizer offload neither
    holds them and only the loss is checked here (DeepSpeed's own global-norm check still skips).
    """
    grads = getattr(engine.optimizer, "averaged_gradients", None)
    tensors = []
    for group in grads.values() if isinstance(grads, dict) else []:
        if isinstance(group, torch.Tensor):
            tensors.append(group)
        elif group:
            tensors += [t for t in group if t is not None]
    if not tensors:
        tensors = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def step_unless_nonfinite(engine: Any, loss_finite: bool) -> bool:
    """``engine.step()`` at the accumulation boundary, unless any rank has a non-finite loss or
    gradient: then the step's gradients are dropped and weights, optimizer state and LR schedule
    stay untouched. Returns whether the step was applied. Collective (one all-reduce).

    Why not rely on DeepSpeed: its overflow skip exists for fp16 loss scaling and, in 0.19 ZeRO-3,
    for a non-finite global norm; which paths check what differs by stage and version. Deciding
    here, before ``engine.step()``, is the same on every configuration. DeepSpeed's counters are
    advanced as for one of its own skipped steps, so accumulation boundaries stay aligned.
    """
    from .dist import any_rank

    bad = any_rank(not (loss_finite and local_grads_finite(engine)))
    if not bad:
        engine.step()
        return True
    _drop_gradients(engine.optimizer)
    engine.zero_grad()
    engine.micro_steps += 1
    engine.global_steps += 1
    engine.global_samples += engine.train_batch_size()
    engine.skipped_steps += 1
    return False


def _drop_gradients(opt: Any) -> None:
    """What DeepSpeed's ZeRO optimizers do with the gradients of an overflowed (skipped) step."""
    clean_up = getattr(opt, "_overflow_clean_up", None)
    if callable(clean_up):  # ZeRO-3: zero_grad (resets the micro-step counter) + partition buffers
        clean_up(getattr(opt, "loss_scale", 1.0))
        return
    if hasattr(opt, "zero_grad"):  # ZeRO-1/2 (mirrors DeepSpeedZeroOptimizer.step on overflow), or torch
        opt.zero_grad(set_to_none=True)
    release = getattr(opt, "_release_preflattened_grad_buffers", None)
    if callable(release):
        release()
    if getattr(opt, "cpu_offload", False) and callable(getattr(opt, "reset_cpu_buffers", None)):
        opt.reset_cpu_buffers()
    for name in ("averaged_gradients", "all_grad_tensors"):
        buffers = getattr(opt, name, None)
        if isinstance(buffers, dict):
            for key in buffers:
                buffers[key] = None
