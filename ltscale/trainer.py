"""The LT-Tuning curriculum loop: stages, checkpoints, eval, logging.

What a run writes where is ``ltscale.rundir``'s: ``stage{N}/ckpt/<tag>`` (checkpoint tags
step-XXXXXX, rotated, and final), ``stage{N}/hf`` (the stage's final weights), ``stage{N}/eval.json``
and, written last, ``stage{N}/COMPLETE``.

One DeepSpeed engine serves every stage (the module is the same; only the latent mode changes).
A stage starts from the previous stage's final checkpoint, with its optimizer state when
``optim.stage_strategy=continue`` (the official code's single HF Trainer run) or fresh when ``reset``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
import yaml

from ltscale import faults, run_setup, rundir
from ltscale.batching import resolve_batch, stage_steps
from ltscale.config import RunConfig, diff_configs, save_resolved
from ltscale.data import collate
from ltscale.engine import checkpoint as ckpt
from ltscale.engine import checkpoint_dir as ckpt_dir
from ltscale.engine import comm_stats, dist
from ltscale.engine.ds_config import render_ds_config, resolve_template, write_ds_config
from ltscale.engine.engine import build_engine, gather_state_dict, grad_norm, step_unless_nonfinite
from ltscale.engine.io_wait import wait_for_io
from ltscale.eval.analysis import run_analysis
from ltscale.eval.evaluate import evaluate, format_table, merge_results, summarize, write_results
from ltscale.fsutil import atomic_write_text
from ltscale.inference import load_for_inference
from ltscale.launch_env import rank_env
from ltscale.methods import StageContext, get_method
from ltscale.model.device import to_device
from ltscale.model.io import save_latent_model
from ltscale.monitor import Monitor
from ltscale.run_setup import Ranks, RunData, Sampler, Schedule, build_latent_model, prepare_data
from ltscale.rundir import StageOrderError

log = logging.getLogger(__name__)

FINAL = "final"


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived; every rank saved at the same step boundary and the run stopped."""

    def __init__(self, stage: int, step: int, checkpoint: Path):
        super().__init__(f"stopped by signal at stage {stage} step {step}; resume from {checkpoint}")
        self.checkpoint = checkpoint


class TooManySkippedSteps(RuntimeError):
    """More than ``train.max_skipped_steps`` steps had a non-finite loss or gradient; saved and stopped."""


class StopSignal:
    """Records SIGTERM (preemption, scancel) and SIGUSR1 (Slurm's ``--signal`` lead warning).

    The handler only sets a flag: the loop checks it at step boundaries, all ranks agree through
    one all-reduce (a rank that missed the signal still stops with the others), save, and exit.
    A signal that reached the process before the handler existed (still importing) is lost, so
    the Slurm job also leaves a file at ``LTSCALE_STOP_FILE`` when it asks for a stop; finding it
    on entry counts as the signal.  Without it, a re-sent signal can land only after the run has
    checkpointed past where it started, and the job mistakes the stop for progress.
    """

    FILE_ENV = "LTSCALE_STOP_FILE"

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        requested = os.environ.get(self.FILE_ENV)
        if requested and Path(requested).is_file():
            self.received = signal.SIGUSR1
            log.warning("a stop was requested before this rank took signals (%s): will checkpoint and stop "
                        "at the next step boundary", requested)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.received = signum
        log.warning("received %s: will checkpoint and stop at the next step boundary", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def select_stages(cfg: RunConfig, run_dir: Path, stage_arg: str) -> list[int]:
    n = len(cfg.stages)
    if stage_arg == "all":
        todo = [k for k in range(1, n + 1) if not rundir.stage_complete(run_dir, k)]
        if not todo:
            log.info("all %d stages in %s are already complete; nothing to do", n, run_dir)
        return todo
    if not stage_arg.isdigit() or not 1 <= int(stage_arg) <= n:
        raise ValueError(f"--stage: {stage_arg!r} is not 'all' or a stage number 1..{n}")
    k = int(stage_arg)
    if not rundir.check_stage_order(run_dir, k):
        log.info("stage %d is already complete (%s); nothing to do", k, rundir.complete_file(run_dir, k))
        return []
    return [k]


class Trainer:
    def __init__(self, cfg: RunConfig, stop: StopSignal | None = None):
        self.stop = stop or StopSignal()
        self.info = dist.init_distributed(timeout_s=cfg.engine.collective_timeout_s)
        # micro-batch and accumulation for this world size (train.global_batch_size): recorded below
        self.cfg = cfg = resolve_batch(cfg, self.info.world_size)
        self.run_dir = Path(cfg.run_dir)
        if self.info.is_main:
            warn_on_config_change(cfg, self.run_dir)
            save_resolved(cfg, self.run_dir)
        dist.barrier()
        self.method = get_method(cfg.method)
        self.data: RunData = prepare_data(cfg, self.run_dir, ranks=Ranks(self.info.rank, self.info.world_size,
                                                                          dist.broadcast_object, dist.all_gather_object))
        t = cfg.train
        self.dtype, precision = run_setup.training_precision(cfg)  # one rule: model.dtype, engine.precision
        self.ds_config = render_ds_config(resolve_template(cfg.engine.ds_config), micro_batch=t.micro_batch_size,
                                          grad_accum=t.grad_accum, world_size=self.info.world_size,
                                          grad_clip=cfg.optim.max_grad_norm, precision=precision)
        self.lm = build_latent_model(cfg, self.data, self.ds_config)  # ZeRO-3: partitioned as it is built
        self.io_timeout_s = run_setup.io_timeout(cfg, self.lm, self.info.world_size)
        if self.info.is_main:
            write_ds_config(self.ds_config, self.run_dir / rundir.DS_CONFIG_FILE)
        self.schedule = Schedule(stage_steps(cfg, len(self.data.train), self.info.world_size),
                                 cfg.optim.warmup_ratio, cfg.optim.schedule, cfg.optim.stage_strategy,
                                 [st.lr_scale for st in cfg.stages])
        self.engine = build_engine(self.lm, ds_config=self.ds_config, lr=cfg.optim.lr,
                                   weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas),
                                   eps=cfg.optim.eps, scheduler=self.schedule.multiplier,
                                   external_parameters=self.lm.zero3_external_parameters())
        self.sampler = Sampler(len(self.data.train), seed=t.seed, micro=t.micro_batch_size, accum=t.grad_accum,
                               world=self.info.world_size, rank=self.info.rank)
        self.monitor: Monitor | None = None
        self.results: dict[int, dict] = {}
        self.skipped = 0  # steps skipped for a non-finite loss/gradient (kept in checkpoints)
        self.allgather = comm_stats.install()

    # ------------------------------------------------------------------ entry
    def train(self, stages: list[int]) -> dict[int, dict]:
        self.results = finished_results(self.cfg, self.run_dir)
        first = stages[0]
        start_step = self._restore(first)
        # Events are logged at global step = optimizer steps done; a dead run may have logged past
        # its last checkpoint, so everything after the resume point is purged from the display.
        self.monitor = Monitor.for_rank(self.run_dir / rundir.TB_DIR, self.info.rank,
                                        purge_step=self.schedule.start[first - 1] + start_step + 1)
        try:
            for k in stages:
                self.run_stage(k, start_step if k == first else 0)
        finally:
            self.monitor.close()
        if self.info.is_main:
            print_results_table(self.cfg, self.run_dir, self.results)
        return self.results

    def _restore(self, k: int) -> int:
        """Load where stage ``k`` starts: its own mid-stage checkpoint, or stage k-1's final one."""
        own = rundir.ckpt_dir(self.run_dir, k)
        resume, resume_fallback = self.cfg.resume, self.cfg.resume_fallback
        if resume != "never" and ckpt_dir.latest_tag(own) is not None:
            state = ckpt.load_checkpoint(self.engine, own, fallback=resume_fallback, io_timeout_s=self.io_timeout_s)
            log.info("resuming stage %d at step %d from %s", k, state["step_in_stage"], own)
            self.skipped = int(state.get("skipped_steps", 0))
            return int(state["step_in_stage"])
        if resume == "must":
            raise FileNotFoundError(f"resume=must but {own} holds no checkpoint")
        if k > 1:
            prev = rundir.ckpt_dir(self.run_dir, k - 1)
            if FINAL not in ckpt_dir.list_checkpoints(prev):
                raise StageOrderError(f"stage {k} starts from {prev / FINAL}, which does not exist")
            keep_optimizer = self.cfg.optim.stage_strategy == "continue"
            ckpt.load_checkpoint(self.engine, prev, FINAL, load_optimizer=keep_optimizer, io_timeout_s=self.io_timeout_s)
            if not keep_optimizer:
                self._set_schedule_step(self.schedule.start[k - 1])
        return 0

    # ------------------------------------------------------------------ one stage
    def run_stage(self, k: int, start_step: int) -> None:
        cfg, st, lm = self.cfg, self.cfg.stages[k - 1], self.lm
        lm.set_latent_mode(st.mode, alpha=st.alpha, temperature=st.temperature, top_p=st.top_p)
        if start_step == 0 and k > 1 and cfg.optim.stage_strategy == "reset":
            self._reset_optimizer_state()
        n_steps = self.schedule.steps[k - 1]
        # Only the examples this stage will draw are scored: a stage of 0.2 epochs pays for 20%.
        used = self.sampler.used_indices(k, n_steps)
        subset = self.data.train.select(used)  # lazy: examples are built when a batch needs them
        ctx = StageContext(cfg=cfg, stage_index=k, run_dir=self.run_dir, tokenizer=self.data.tokenizer,
                           thinking_id=self.data.thinking_id, special_ids=self.data.special_ids,
                           forward_logits=self._scoring_forward(k), rank=self.info.rank,
                           world_size=self.info.world_size, all_gather=dist.all_gather_object, barrier=dist.barrier)
        scored, stats = self.method.stage_examples(subset, ctx)
        self.method.prepare_stage(self.engine.module, scored, ctx)
        # Every step of the stage runs the same number of sequential passes: the most latents any
        # example of the stage holds, plus one. Ranks stay in lockstep under ZeRO-3 without a
        # collective per step, and DeepSpeed's recorded parameter trace stays valid, so gathered
        # weights are reused across passes instead of re-gathered (a changing pass count
        # invalidates the trace every step).
        passes = 1 + scored.max_latents() if lm.uses_rollout else 1
        log.info("stage %d (%s): %d steps from step %d, %d examples, %d passes per step", k, st.mode, n_steps,
                 start_step, len(self.data.train), passes)
        pad_id = self.data.tokenizer.pad_token_id
        window = {"loss": 0.0, "n": 0, "tokens": 0, "latent": 0, "samples": 0, "t0": time.perf_counter(),
                  "gathered": self.allgather.bytes}
        self.engine.train()
        for step in range(start_step, n_steps):
            if dist.any_rank(self.stop.received is not None):
                tag = f"step-{step:06d}"
                self._save(k, tag, step, complete=False)
                self.monitor.flush()
                raise Preempted(k, step, rundir.ckpt_dir(self.run_dir, k) / tag)
            ok, before = True, (window["loss"], window["n"])  # ok: every loss of this step finite on this rank
            for a in range(cfg.train.grad_accum):
                host = collate([scored.at_train_index(i) for i in self.sampler.indices(k, n_steps, step, a)],
                               pad_id=pad_id)
                # The batch goes in on the host: LatentLM plans the rollout there and ships the plan
                # in one copy (rollout_plan.py); ids moved first would be read back for the plan.
                out = self.engine(host["input_ids"], attention_mask=host["attention_mask"], labels=host["labels"],
                                  min_passes=passes, return_logits=False)
                loss = faults.poison_loss(out.loss, stage=k)
                ok = ok and bool(torch.isfinite(loss.detach()))
                self.engine.backward(loss)
                faults.check("step", stage=k)
                if a + 1 < cfg.train.grad_accum:
                    self.engine.step()
                elif not step_unless_nonfinite(self.engine, ok):  # a NaN/inf on any rank: no weight change
                    self._skipped_step(k, step, n_steps)
                    ok = False
                window["loss"] += float(loss.detach())
                window["n"] += 1
                window["tokens"] += int(host["attention_mask"].sum())  # on the host: no device sync
                window["latent"] += int((host["input_ids"] == self.data.thinking_id).sum())
                window["samples"] += host["input_ids"].shape[0]
            if not ok:  # skipped on every rank: its losses are not logged (a window of only those: NaN)
                window["loss"], window["n"] = before
            global_step = self.schedule.start[k - 1] + step + 1
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == n_steps:
                self._log_window(k, step + 1, n_steps, global_step, window)
            if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < n_steps:
                self._save(k, f"step-{step + 1:06d}", step + 1, complete=False)
        if start_step < n_steps:  # else: resumed from this stage's final checkpoint (killed during export/eval)
            self._save(k, FINAL, n_steps, complete=True)
        faults.check("stage_end", stage=k)
        self._finish_stage(k, stats)

    def _skipped_step(self, k: int, step: int, n_steps: int) -> None:
        """Count a skipped step; past ``train.max_skipped_steps`` save (this step counts as done,
        so a resume moves past its batch) and stop with the way out in the message."""
        self.skipped += 1
        limit = self.cfg.train.max_skipped_steps
        if self.info.is_main:
            log.warning("stage %d step %d: non-finite loss or gradient on some rank; step skipped, weights "
                        "unchanged (%d skipped so far, train.max_skipped_steps=%d)", k, step + 1, self.skipped, limit)
        if self.skipped > limit:
            tag = FINAL if step + 1 == n_steps else f"step-{step + 1:06d}"
            self._save(k, tag, step + 1, complete=tag == FINAL)
            raise TooManySkippedSteps(
                f"stage {k} step {step + 1}: {self.skipped} steps skipped for a non-finite loss or gradient "
                f"(train.max_skipped_steps={limit}); saved {rundir.ckpt_dir(self.run_dir, k) / tag}. Lower "
                "optim.lr, check the data, or raise train.max_skipped_steps and resume")

    def _scoring_forward(self, k: int):
        """The current weights' plain forward (no latent substitution), in eval mode: what a method's
        confidence pass scores with."""
        base = self.engine.module.base

        def forward_logits(ids, mask):
            faults.check("score", stage=k)
            ids, mask = to_device((ids, mask), self.engine.device)
            was_training = self.engine.module.training
            self.engine.eval()
            try:
                # rows past the tokenizer are vocabulary padding (model/builder.py fit_vocab), not tokens
                return base(input_ids=ids, attention_mask=mask).logits[..., : len(self.data.tokenizer)]
            finally:
                self.engine.train(was_training)

        return forward_logits

    def _log_window(self, k: int, step: int, n_steps: int, global_step: int, w: dict) -> None:
        elapsed = max(time.perf_counter() - w["t0"], 1e-9)
        loss = dist.all_reduce_sum(w["loss"] / max(w["n"], 1)) / self.info.world_size if w["n"] else math.nan
        tokens = dist.all_reduce_sum(float(w["tokens"]))
        latent = dist.all_reduce_sum(float(w["latent"])) / max(dist.all_reduce_sum(float(w["samples"])), 1.0)
        lr = self.engine.get_lr()[0]
        gnorm = grad_norm(self.engine)
        gathered = (self.allgather.bytes - w["gathered"]) / max(w["n"] // self.cfg.train.grad_accum, 1)
        self.monitor.scalars({"train/loss": loss, "train/lr": lr, "train/grad_norm": gnorm,
                              "latent/tokens_per_sample": latent, "perf/tokens_per_s": tokens / elapsed,
                              "perf/allgather_bytes": gathered, "train/stage": k,
                              "train/skipped_steps": self.skipped}, global_step)
        if self.info.is_main:
            log.info("stage %d step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  latent/sample %.2f  tok/s %.0f",
                     k, step, n_steps, loss, lr, gnorm, latent, tokens / elapsed)
        w.update(loss=0.0, n=0, tokens=0, latent=0, samples=0, t0=time.perf_counter(), gathered=self.allgather.bytes)

    def _save(self, k: int, tag: str, step_in_stage: int, *, complete: bool) -> None:
        state = {"stage": k, "step_in_stage": step_in_stage, "stage_complete": complete,
                 "global_step": self.schedule.start[k - 1] + step_in_stage, "mode": self.cfg.stages[k - 1].mode,
                 "skipped_steps": self.skipped}
        ckpt.save_checkpoint(self.engine, rundir.ckpt_dir(self.run_dir, k), tag, state,
                             keep_last_n=self.cfg.train.keep_last_n, io_timeout_s=self.io_timeout_s)

    def _finish_stage(self, k: int, stats: dict) -> None:
        """Export HF weights, evaluate them (sharded over ranks), then mark the stage complete."""
        sdir = rundir.stage_dir(self.run_dir, k)
        state = gather_state_dict(self.engine)
        if self.info.is_main:
            faults.check("export", stage=k)
            save_latent_model(rundir.hf_dir(self.run_dir, k), config=self.lm.base.config, latent_state=state,
                              tokenizer=self.data.tokenizer,
                              latent_config={**self.lm.latent_config(),
                                             **self.method.checkpoint_meta(self.cfg, k, self.data.special_ids)})
        del state
        # Rank 0 writes alone (8B in bf16: 16 GB): the others wait outside timed collectives.
        wait_for_io(f"stage {k} export to {rundir.hf_dir(self.run_dir, k)}", self.io_timeout_s)
        summary = self._evaluate(k, sdir)
        if self.info.is_main:
            summary = json.loads(json.dumps(summary)) if summary else None  # int dict keys -> str
            marker = {"stage": k, "mode": self.cfg.stages[k - 1].mode, "steps": self.schedule.steps[k - 1],
                      "global_step": self.schedule.start[k], "insertion": stats, "eval": summary}
            ckpt.write_json_atomic(rundir.complete_file(self.run_dir, k), marker)
        wait_for_io(f"stage {k} evaluation report, analyses and {rundir.complete_file(self.run_dir, k)}",
                    self.io_timeout_s)

    def _evaluate(self, k: int, sdir: Path) -> dict | None:
        records = self.data.eval_records[: self.cfg.eval.subset]  # subset=None: all
        if not self.cfg.eval.after_each_stage or not records:
            return None
        # On the training device, in the training dtype (a CPU eval would outlast the stage).
        inf = load_for_inference(rundir.hf_dir(self.run_dir, k), device=self.engine.device, dtype=self.dtype,
                                 cfg=self.cfg)  # the method's decoding
        _, mine = evaluate(inf, records, batch_size=self.cfg.eval.batch_size, max_new_tokens=self.cfg.eval.max_new_tokens,
                           progress=self.info.is_main, rank=self.info.rank, world_size=self.info.world_size)
        shards = dist.all_gather_object(mine)
        if not self.info.is_main:
            return None
        per_example = merge_results(shards)
        summary = summarize(per_example)
        write_results(summary, per_example, sdir / rundir.EVAL_FILE, meta={"stage": k, "mode": self.cfg.stages[k - 1].mode})
        result = summary.to_dict()
        self.results[k] = result
        self.monitor.scalars(summary.scalars("eval"), self.schedule.start[k])
        if self.cfg.eval.analysis:
            faults.check("analysis", stage=k)
            log_analysis(self.monitor, inf.model, inf.tokenizer, records, per_example, self.cfg, k, self.schedule.start[k],
                         sdir)
        self.monitor.flush()
        log.info("stage %d eval: accuracy %.3f (numeric %.3f), %.2f latent tokens per answer", k,
                 summary.accuracy_official, summary.accuracy_numeric, summary.mean_latent_tokens)
        return result

    # ------------------------------------------------------------------ optimizer plumbing
    def _reset_optimizer_state(self) -> None:
        """``stage_strategy=reset`` inside one process: AdamW re-initialises empty state lazily.

        The LR schedule needs no reset: ``Schedule.multiplier`` already restarts per stage.
        """
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        inner.state.clear()

    def _set_schedule_step(self, step: int) -> None:
        sched = self.engine.lr_scheduler
        sched.last_epoch = step - 1
        sched.step()



def log_analysis(monitor: Monitor, lm, tokenizer, records, per_example, cfg: RunConfig, k: int, step: int,
                 sdir: Path) -> None:
    """Rank 0, after a stage's eval: the paper's analyses as ``latent/...`` scalars and images.

    Monitoring must not kill a finished stage: a failure is logged with its traceback and skipped.
    """
    try:
        res = run_analysis(lm, tokenizer, records[: cfg.eval.analysis_samples], max_new_tokens=cfg.eval.max_new_tokens,
                           probe_steps=cfg.eval.probe_steps, use_chat_template=cfg.model.use_chat_template,
                           examples=per_example)
        monitor.scalars(res.scalars("latent"), step)
        for name, fig in res.figures().items():
            monitor.figure(f"analysis/{name}", fig, step)
        atomic_write_text(sdir / rundir.ANALYSIS_FILE, json.dumps({"stage": k, **res.to_json()}, indent=2) + "\n")
    except Exception:  # noqa: BLE001 - see docstring
        log.exception("stage %d: analysis failed (training results are unaffected)", k)


def warn_on_config_change(cfg: RunConfig, run_dir: Path) -> None:
    """A resumed run may change logging knobs, but a changed data/model/stage key deserves a look."""
    old_file = run_dir / rundir.CONFIG_FILE
    if not old_file.is_file():
        return
    changed = diff_configs(yaml.safe_load(old_file.read_text()) or {}, cfg.to_dict())
    if changed:
        log.warning("%s differs from this run's config at: %s (the new config is used and saved)", old_file,
                    ", ".join(changed))


def finished_results(cfg: RunConfig, run_dir: Path) -> dict[int, dict]:
    out = {}
    for k in range(1, len(cfg.stages) + 1):
        done = rundir.stage_dir(run_dir, k) / rundir.EVAL_FILE
        if rundir.stage_complete(run_dir, k) and done.is_file():
            out[k] = json.loads(done.read_text())
    return out


def print_results_table(cfg: RunConfig, run_dir: Path, results: dict[int, dict]) -> None:
    rows = [{"stage": k, "mode": cfg.stages[k - 1].mode, **v} for k, v in sorted(results.items()) if v]
    if not rows:
        return
    table = format_table(rows)
    (run_dir / rundir.EVAL_TABLE_FILE).write_text(table + "\n")
    print(table, flush=True)


def train(cfg: RunConfig, stage: str = "all") -> dict[int, dict]:
    # Fail on stage ordering before paying for data, model and engine set-up on every rank.
    stages = select_stages(cfg, Path(cfg.run_dir), stage)
    if not stages:
        if rank_env().rank == 0:  # also a launcher-less srun step (ltscale.launch_env)
            print_results_table(cfg, Path(cfg.run_dir), finished_results(cfg, Path(cfg.run_dir)))
        return finished_results(cfg, Path(cfg.run_dir))
    try:
        # Handlers go in before the minutes of set-up, so a signal then is not lost.
        with StopSignal() as stop:
            return Trainer(cfg, stop).train(stages)
    finally:
        # Without an orderly process-group teardown ranks intermittently abort at exit (134).
        dist.shutdown_distributed()
