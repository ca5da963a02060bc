"""The lm-evaluation-harness model ``ltscale``: any ltscale checkpoint, decoded with its own method.

Importing this module registers the class with lm-eval (``--model ltscale``); ``ltscale lm-eval``
(``ltscale.lmeval.entry``) does that before it runs lm-eval's CLI, and Python users import it
before ``lm_eval.simple_evaluate(model="ltscale", ...)``.

Requests and what they mean for a latent model (docs/lm-eval notes live in README, "Evaluating
with lm-evaluation-harness"):

* ``generate_until``: greedy decoding with the checkpoint's method, ``batch_size`` rows in flight,
  each request's ``until`` and ``max_gen_toks`` honoured (``ltscale.lmeval.decode``): a row stops
  decoding at its stop string, and its slot goes to the next request. The returned
  text shows latent steps as ``<thinking>``, so lm-eval's logged samples show where the model
  thought. The number of latent steps per sample cannot travel in the returned string, so the
  backend keeps one record per request (task, doc_id, repeat, latent steps, generated tokens,
  truncation, uncut text) in :attr:`LTScaleLM.samples`, gathers them on rank 0, logs the mean
  per task and, with ``latent_log=PATH``, writes them as JSONL (``ltscale lm-eval`` sets it next to
  ``--output_path``).
* ``loglikelihood`` / ``loglikelihood_rolling``: explicit-mode scoring. Where latent steps go is a
  decoding decision, not part of a given continuation, so the continuation is scored as the
  checkpoint's decoder reads plain text (every position a token embedding, no latent rollout, no
  method wrapper). Multiple-choice and perplexity tasks then measure what latent training kept
  of the base model's text modelling.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval fills its registry lazily only while it is empty:
import torch  # registering ``ltscale`` first would hide ``--model hf`` and the other built-ins)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from ltscale.launch_env import rank_env
from ltscale.lmeval.decode import (
    DEFAULT_BATCH_SIZE,
    context_ids,
    cut_at_stops,
    generate,
    greedy_settings,
    load,
)
from ltscale.model.device import to_device

__all__ = ["MODEL_ARGS", "LTScaleLM", "ModelArgsError", "check_model_args"]

logger = logging.getLogger(__name__)

#: ``--model_args`` keys (besides method options spelled ``SECTION.KEY``, e.g. ``soft_thinking.top_k``).
MODEL_ARGS = (
    "checkpoint", "method", "without_thinking", "batch_size", "mode", "device", "dtype", "max_gen_toks",
    "latent_log", "pretrained", "max_batch_size", "trust_remote_code",
)  # fmt: skip
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MODES = ("hidden", "fusion", "pause")


class ModelArgsError(ValueError):
    """Bad ``--model_args`` or generation settings: printed as one line by ``ltscale lm-eval``."""


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no", "", "none"):
        return False
    raise ModelArgsError(f"--model_args {key}={value!r}: expected true or false")


def _positive_int(key: str, value: Any) -> int:
    try:
        n = int(str(value))
    except ValueError:
        raise ModelArgsError(
            f"--model_args {key}={value!r}: expected a positive integer"
            + (
                " (ltscale decodes with continuous batching: give the rows in flight, e.g. 16)"
                if key == "batch_size"
                else ""
            )
        ) from None
    if n < 1:
        raise ModelArgsError(f"--model_args {key}={value!r}: must be >= 1")
    return n


def check_model_args(keys: Any) -> None:
    """An unknown ``--model_args`` key is a :class:`ModelArgsError` naming it and the valid keys
    (``ltscale lm-eval`` checks before lm-eval indexes its tasks, the constructor again)."""
    for key in keys:
        section, dot, name = str(key).partition(".")
        if key not in MODEL_ARGS and not (dot and section and name):
            raise ModelArgsError(
                f"--model_args: unknown key {key!r} (valid: {', '.join(MODEL_ARGS)}; "
                "method options as SECTION.KEY, e.g. soft_thinking.top_k=5)"
            )


def _method_options(options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    check_model_args(options)
    out: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


def _pick_device(device: str | None, local_rank: int, world_size: int) -> torch.device:
    """lm-eval always sends a device (``cuda:0`` by default, as its HF backend reads it): a CUDA
    device means this rank's GPU under a launcher, and the CPU on a machine without one."""
    text = str(device or "auto")
    if text == "auto" or text.startswith("cuda"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{local_rank}" if world_size > 1 or text == "auto" else text)
    return torch.device(text)


@register_model("ltscale")
class LTScaleLM(TemplateLM):
    """lm-eval model backed by an ltscale checkpoint (HF dir, stage dir or run dir)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        method: str | None = None,
        without_thinking: Any = False,
        batch_size: Any = None,
        mode: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        max_gen_toks: Any = 256,
        latent_log: str | None = None,
        pretrained: str | None = None,
        max_batch_size: Any = None,
        trust_remote_code: Any = False,  # lm-eval sends it for task datasets too; not needed here
        **options: Any,
    ) -> None:
        super().__init__()
        method_options = _method_options(options)
        if max_batch_size is not None:
            raise ModelArgsError(
                "--max_batch_size only bounds --batch_size auto, which ltscale does not take: "
                "give batch_size=N (rows in flight)"
            )
        if pretrained and checkpoint and str(pretrained) != str(checkpoint):
            raise ModelArgsError("--model_args: checkpoint and pretrained (its alias) name different paths")
        checkpoint = checkpoint or pretrained  # `pretrained` also names lm-eval's output folder after it
        if not checkpoint:
            raise ModelArgsError("--model_args: checkpoint=RUN_OR_STAGE_OR_HF_DIR is required")
        if mode is not None and mode not in _MODES:
            raise ModelArgsError(f"--model_args mode={mode!r}: expected one of {', '.join(_MODES)}")
        if dtype is not None and str(dtype) not in _DTYPES:
            raise ModelArgsError(f"--model_args dtype={dtype!r}: expected one of {', '.join(_DTYPES)}")
        self.batch_size = (
            DEFAULT_BATCH_SIZE if batch_size is None else _positive_int("batch_size", batch_size)
        )
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.latent_log = Path(latent_log) if latent_log else None
        self._rank, self._world_size, local_rank = 0, 1, 0
        if rank_env().world_size > 1:  # torchrun/deepspeed, mpirun, PMI, srun (ltscale.launch_env)
            from ltscale.engine.dist import init_distributed

            info = init_distributed()
            self._rank, self._world_size, local_rank = info.rank, info.world_size, info.local_rank
        self._device = _pick_device(device, local_rank, self._world_size)
        try:
            self._loaded = load(
                str(checkpoint),
                method=method,
                options=method_options,
                mode=mode,
                device=str(self._device),
                dtype=_DTYPES[str(dtype)] if dtype is not None else None,
                without_thinking=_bool("without_thinking", without_thinking),
            )
        except (FileNotFoundError, ValueError) as e:
            raise ModelArgsError(f"--model_args checkpoint={checkpoint}: {e}".replace("\n", " ")) from None
        self.tokenizer = self._loaded.tokenizer
        self._chats: dict[str, list[dict[str, str]]] = {}  # rendered context -> the chat it came from
        self._warned_plain = False
        #: one dict per generated request (see module docstring); on rank 0, every rank's
        self.samples: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []  # this rank's records of the running call

    # ------------------------------------------------------------------ lm-eval plumbing

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None):
        """``--model_args`` win over the harness's ``--batch_size``/``--device`` (it always sends a batch size)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return int(getattr(self._loaded.lm.base.config, "max_position_embeddings", None) or 2048)

    @property
    def tokenizer_name(self) -> str:
        return str(self._loaded.path).replace("/", "__")

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size <= 1:
            return tensor
        from ltscale.engine.dist import all_gather_object

        parts = all_gather_object(tensor.detach().cpu())
        return torch.cat([p.reshape(-1) for p in parts]).to(tensor.device)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self._world_size <= 1:
            return [obj]
        from ltscale.engine.dist import all_gather_object

        parts = all_gather_object(obj)
        return parts if self._rank == dst else None

    def barrier(self) -> None:
        if self._world_size > 1:
            from ltscale.engine.dist import barrier

            barrier()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Scoring's encoding: bos (unless ``add_special_tokens=False`` or already spelled) + the text."""
        bos = self.tokenizer.bos_token_id
        add_bos = add_special_tokens is not False and bos is not None
        if add_bos and self.tokenizer.bos_token and string.startswith(self.tokenizer.bos_token):
            add_bos = False
        return ([bos] if add_bos else []) + list(self.tokenizer.encode(string, add_special_tokens=False))

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render ``chat_history`` with the checkpoint's chat template, remembering the chat so that
        :meth:`generate_until` encodes it as ltscale encodes a chat prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelArgsError(
                f"--apply_chat_template: the tokenizer of {self._loaded.path} has no chat template "
                "(its prompts are ltscale's plain format: drop the flag)"
            )
        from ltscale.data.formatting import CHAT_TEMPLATE_KWARGS

        text = self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt, **CHAT_TEMPLATE_KWARGS
        )
        if add_generation_prompt:
            self._chats[text] = [dict(m) for m in chat_history]
        return text

    # ------------------------------------------------------------------ generation

    def _prompt(self, context: str) -> list[int]:
        chat = self._chats.get(context)
        if chat is None and not self._warned_plain and getattr(self.tokenizer, "chat_template", None):
            logger.warning(
                "the checkpoint's tokenizer has a chat template, which ltscale trains on; this request "
                "is not chat-formatted: pass --apply_chat_template with an ltscale_*_chat task for "
                "ltscale's training format"
            )
            self._warned_plain = True
        return context_ids(self.tokenizer, context, chat) + self._loaded.suffix

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        prompts, settings = [], []
        for req in requests:
            context, gen_kwargs = req.args
            where = f"task {req.task_name}" if getattr(req, "task_name", None) else "generate_until"
            try:
                settings.append(greedy_settings(gen_kwargs, default_max=self.max_gen_toks, where=where))
            except ValueError as e:
                raise ModelArgsError(str(e)) from None
            prompts.append(self._prompt(context))
        eos_text = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else ""
        stops = [until if eos_text in until else [*until, eos_text] for until, _ in settings]
        texts: list[str] = [""] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, (_, max_gen) in enumerate(settings):
            groups.setdefault(max_gen, []).append(i)
        show = not disable_tqdm and self._rank == 0
        with tqdm(total=len(requests), desc="ltscale generate_until", disable=not show) as bar:
            for max_gen, idx in groups.items():
                gens = generate(
                    self._loaded,
                    [prompts[i] for i in idx],
                    max_new_tokens=max_gen,
                    slots=self.batch_size,
                    on_finish=bar.update,
                    stops=[stops[i] for i in idx],
                )
                for i, gen in zip(idx, gens, strict=True):
                    texts[i] = cut_at_stops(gen.text, stops[i])
                    self._record(requests[i], gen, texts[i])
                    self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
        self._publish()
        return texts

    def _record(self, req: Any, gen: Any, response: str) -> None:
        self._pending.append({
            "task": getattr(req, "task_name", None), "doc_id": getattr(req, "doc_id", None),
            "num_latent": gen.num_latent, "num_generated": gen.num_generated, "truncated": gen.truncated,
            "response": response, "generated_text": gen.text, "_repeats": getattr(req, "repeats", None) or 1,
        })  # fmt: skip

    def _publish(self) -> None:
        """Gather this call's records on rank 0 (lm-eval pads ranks with copies of a request: kept once
        per repeat), log the mean latent steps per task and write ``latent_log``."""
        gathered = self.gather_object(self._pending)
        self._pending = []
        if gathered is None:
            return
        seen: Counter = Counter()
        for rec in (r for part in gathered for r in part):
            key = (rec["task"], rec["doc_id"])
            repeats = rec.pop("_repeats")
            if seen[key] < repeats:
                self.samples.append({**rec, "repeat": seen[key]})
            seen[key] += 1
        self.samples.sort(
            key=lambda r: (str(r["task"]), r["doc_id"] if r["doc_id"] is not None else -1, r["repeat"])
        )
        by_task: dict[str, list[dict[str, Any]]] = {}
        for rec in self.samples:
            by_task.setdefault(str(rec["task"]), []).append(rec)
        for task, recs in by_task.items():
            n = len(recs)
            logger.info(
                "ltscale %s: n=%d mean latent steps=%.2f mean generated tokens=%.2f truncated=%d",
                task, n, sum(r["num_latent"] for r in recs) / n, sum(r["num_generated"] for r in recs) / n,
                sum(r["truncated"] for r in recs),
            )  # fmt: skip
        if self.latent_log is not None:
            from ltscale.fsutil import atomic_write_text

            atomic_write_text(
                self.latent_log, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.samples)
            )

    # ------------------------------------------------------------------ scoring (explicit mode)

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any):
        """Log-probabilities over the tokenizer's vocabulary: padded embedding rows (never a token,
        zero, so logit 0) are masked as in training, where a raw HF model would give them mass."""
        lm = self._loaded.lm
        base = lm.base
        base.eval()
        limit = self.max_length
        rows = []
        for _, ctx, cont in requests:
            if not cont:
                raise ModelArgsError("loglikelihood: a continuation encodes to no tokens")
            rows.append(((list(ctx) + list(cont))[-(limit + 1) :][:-1], list(cont)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        show = not disable_tqdm and self._rank == 0
        for start in tqdm(
            range(0, len(order), self.batch_size), desc="ltscale loglikelihood", disable=not show
        ):
            batch = order[start : start + self.batch_size]
            width = max(len(rows[i][0]) for i in batch)
            ids = torch.full((len(batch), width), int(pad), dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, : len(rows[i][0])] = torch.tensor(rows[i][0], dtype=torch.long)
            with torch.no_grad():  # right padding under a causal mask: real positions never see it
                logits = lm.mask_padded_rows(base(input_ids=to_device(ids, self._device)).logits)
                logp = torch.log_softmax(logits, dim=-1).cpu()
            for r, i in enumerate(batch):
                inp, cont = rows[i]
                target = torch.tensor(cont, dtype=torch.long)
                lp = logp[r, len(inp) - len(cont) : len(inp)]
                score = (
                    float(lp.gather(1, target[:, None]).sum()),
                    bool((lp.argmax(dim=-1) == target).all()),
                )
                out[i] = score
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        totals = []
        for (string,) in (req.args for req in requests):
            windows = [
                lm_utils.make_disjoint_window(w)
                for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
            totals.append(sum(s for s, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), totals[-1])
        return totals
