"""ltscale's benchmarks as lm-eval tasks, written at run time, and the scoring they use.

Why written at run time: a task YAML names its data by absolute path, and the data lives where
``$LTSCALE_DATA_DIR`` says. :func:`write_tasks` loads each benchmark with ltscale's own loader
(``ltscale.eval.benchmarks.load_benchmark``: the records ``ltscale eval --data NAME`` scores, same
question normalisation, same gold answers), writes them as JSONL and writes the YAML beside them.
``ltscale lm-eval`` does it before every run and passes the directory as ``--include_path``;
``python -m ltscale.lmeval.tasks DIR`` writes it for plain ``lm_eval`` or the Python API.

Tasks (0-shot, greedy):

* ``ltscale_gsm8k``, ``ltscale_svamp``, ``ltscale_asdiv``: the data pack (GSM8K test 1,319; SVAMP
  1,000; ASDiv 2,159); group ``ltscale_math`` = the three, unweighted mean (``ltscale eval --data
  all``'s average). Skipped when the data pack is missing.
* ``ltscale_tiny``: the embedded default's 200 held-out synthetic problems (``configs/tiny.yaml``:
  the set ``make run`` evaluates after each stage), ``max_gen_toks`` as that config's eval.
* ``*_chat`` twins (``ltscale_math_chat`` too): the user turn is the question alone, ltscale's
  training format for a tokenizer with a chat template; use them with ``--apply_chat_template``.
* ``gsm8k_offline``, ``gsm8k_cot_offline``: lm-eval's own ``gsm8k`` (5-shot) and ``gsm8k_cot``
  (8-shot) unchanged except that they read the data pack's raw GSM8K files (no hub access).

Prompt: ``doc_to_text`` is ltscale's plain prompt ``Question: <q>\\nAnswer:\\n``. Scoring mirrors
``ltscale/eval/extraction.py`` by calling it: one filter (``extract``: the official rule, the text
after the last ``#`` with commas and ``<thinking>`` removed) and two metrics, ``official`` (string
equality, the paper's numbers) and ``numeric`` (value equality: ``18.0`` == ``18``). EOS ends an
answer (``until`` is empty), as in ``ltscale eval``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ltscale.eval.extraction import extract_answer, numeric_correct, official_correct

__all__ = [
    "CHAT_TEXT",
    "PLAIN_TEXT",
    "TASK_PREFIX",
    "data_pack_tasks",
    "default_tasks_dir",
    "extract_answers",
    "numeric",
    "official",
    "write_tasks",
]

logger = logging.getLogger(__name__)

TASK_PREFIX = "ltscale_"
#: ``doc_to_text`` of the plain tasks; equals ``ltscale.data.formatting.plain_prompt_text`` (tested).
PLAIN_TEXT = "Question: {{question}}\nAnswer:\n"
#: ``doc_to_text`` of the ``_chat`` tasks: the user turn ltscale trains chat-template models on.
CHAT_TEXT = "{{question}}"
DATA_PACK = ("gsm8k", "svamp", "asdiv")
_ANSWER_MAX = 256  # ltscale eval's --max-new-tokens default


# ------------------------------------------------------------------------------ scoring


def extract_answers(resps: Sequence[Sequence[str]], docs: Sequence[dict[str, Any]]) -> list[list[str]]:
    """lm-eval ``custom`` filter: every response reduced to its answer by the official rule."""
    return [[extract_answer(r if isinstance(r, str) else "") for r in rs] for rs in resps]


def official(references: Sequence[str], predictions: Sequence[str], **_: Any) -> float:
    """lm-eval metric: the official string comparison (``official_correct``)."""
    return float(official_correct(str(predictions[0]), str(references[0])))


def numeric(references: Sequence[str], predictions: Sequence[str], **_: Any) -> float:
    """lm-eval metric: numeric equality of the extracted answer (``numeric_correct``)."""
    return float(numeric_correct(str(predictions[0]), str(references[0])))


# ------------------------------------------------------------------------------ task files


def data_pack_tasks() -> list[str]:
    """Task and group names that need the data pack (written only when ``$LTSCALE_DATA_DIR`` has it)."""
    names = [f"{TASK_PREFIX}{n}" for n in (*DATA_PACK, "math")]
    return names + [f"{n}_chat" for n in names] + list(STOCK_GSM8K.values())


def default_tasks_dir() -> Path:
    """``$LTSCALE_LMEVAL_TASKS``, else ``$XDG_CACHE_HOME/ltscale/lmeval_tasks`` (``~/.cache``)."""
    env = os.environ.get("LTSCALE_LMEVAL_TASKS")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "ltscale" / "lmeval_tasks"


def _sources() -> dict[str, tuple[Callable[[], list[Any]], int]]:
    """name -> (records loader, max_gen_toks)."""
    from ltscale.eval.benchmarks import load_benchmark

    out: dict[str, tuple[Callable[[], list[Any]], int]] = {
        name: ((lambda n=name: load_benchmark(n)), _ANSWER_MAX) for name in DATA_PACK
    }
    from ltscale.run_config import load_config

    tiny = load_config(None)  # the embedded default, configs/tiny.yaml

    def tiny_records() -> list[Any]:
        import dataclasses

        from ltscale.run_setup import load_split_records

        # The held-out split does not depend on n_train (ltscale.data.synthetic.synthetic_splits);
        # one training problem instead of 16,000 saves seconds on every run.
        s = dataclasses.replace(tiny.data.synthetic, n_train=1)
        return load_split_records(
            dataclasses.replace(tiny, data=dataclasses.replace(tiny.data, synthetic=s)), "eval"
        )

    out["tiny"] = (tiny_records, tiny.eval.max_new_tokens)
    return out


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is a subset of it)."""
    return json.dumps(text, ensure_ascii=False)


def _task_yaml(task: str, data: Path, doc_to_text: str, max_gen_toks: int) -> str:
    fn = "!function ltscale.lmeval.tasks"
    return f"""\
# Written by ltscale (ltscale/lmeval/tasks.py); regenerated by every `ltscale lm-eval` run.
task: {task}
tag: [ltscale]
dataset_path: json
dataset_kwargs:
  data_files:
    test: {_q(str(data))}
test_split: test
output_type: generate_until
num_fewshot: 0
doc_to_text: {_q(doc_to_text)}
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: []
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_gen_toks}
filter_list:
  - name: extract
    filter:
      - function: custom
        filter_fn: {fn}.extract_answers
      - function: take_first
metric_list:
  - metric: {fn}.official
    aggregation: mean
    higher_is_better: true
  - metric: {fn}.numeric
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _group_yaml(group: str, tasks: Sequence[str]) -> str:
    metrics = "".join(
        f"  - metric: {m}\n    filter_list: [extract]\n    aggregation: mean\n    weight_by_size: false\n"
        for m in ("official", "numeric")
    )
    return (
        "# Written by ltscale (ltscale/lmeval/tasks.py): the unweighted mean, as `ltscale eval --data all`.\n"
        f"group: {group}\ntask: [{', '.join(tasks)}]\naggregate_metric_list:\n{metrics}metadata:\n  version: 1.0\n"
    )


#: lm-eval's own GSM8K tasks (task file in lm_eval/tasks/gsm8k/) -> the offline copy written here.
STOCK_GSM8K = {"gsm8k.yaml": "gsm8k_offline", "gsm8k-cot.yaml": "gsm8k_cot_offline"}


def _stock_yaml(task: str, stock: Path, raw: Path) -> str:
    return f"""\
# Written by ltscale (ltscale/lmeval/tasks.py): lm-eval's own task (prompt, few-shot examples,
# filters, metric) reading the data pack's raw GSM8K files instead of the hub.
include: {_q(str(stock))}
task: {task}
tag: [ltscale]
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    train: {_q(str(raw / "raw_train.jsonl"))}
    test: {_q(str(raw / "raw_test.jsonl"))}
"""


def _write_stock_gsm8k(out_dir: Path) -> list[str]:
    """The offline copies of lm-eval's ``gsm8k`` / ``gsm8k_cot`` (when lm-eval and the raw files are there)."""
    import importlib.util

    from ltscale.eval.benchmarks import data_dir

    spec = importlib.util.find_spec("lm_eval")
    raw = data_dir() / "gsm8k"
    if spec is None or spec.origin is None or not (raw / "raw_test.jsonl").is_file():
        return []
    written = []
    for name, task in STOCK_GSM8K.items():
        stock = Path(spec.origin).parent / "tasks" / "gsm8k" / name
        if stock.is_file():
            _write_if_changed(out_dir / f"{task}.yaml", _stock_yaml(task, stock, raw.resolve()))
            written.append(task)
    return written


def _write_if_changed(path: Path, text: str) -> None:
    """Unchanged files keep their mtime, so lm-eval's dataset cache stays valid across runs."""
    from ltscale.fsutil import atomic_write_text

    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        atomic_write_text(path, text)


def write_tasks(
    out_dir: str | Path, names: Sequence[str] | None = None, *, files: dict[str, str] | None = None
) -> list[str]:
    """Write the task files (YAML + JSONL data) for ``names`` (default: all that load) into ``out_dir``.

    ``files`` adds tasks ``ltscale_<name>`` for other record files (anything ``ltscale eval --data``
    reads), e.g. ``{"mine": "data/test.jsonl"}``; their errors are raised, not skipped. A
    data-pack benchmark whose files are missing is skipped with a log line (the tiny set needs no
    files). Returns the task and group names written.
    """
    from ltscale.data.records import DataError
    from ltscale.eval.benchmarks import load_benchmark

    out_dir = Path(out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    sources = _sources()
    unknown = sorted(set(names or ()) - set(sources))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {', '.join(sources)}")
    todo = [(n, *sources[n], True) for n in (list(sources) if names is None else names)]
    todo += [(n, (lambda f=f: load_benchmark(f)), _ANSWER_MAX, False) for n, f in (files or {}).items()]
    written: list[str] = []
    for name, loader, max_gen_toks, optional in todo:
        try:
            records = loader()
        except (DataError, FileNotFoundError) as e:
            if not optional:
                raise
            logger.info("lm-eval task %s%s not written: %s", TASK_PREFIX, name, e)
            continue
        # The record format (``ltscale eval --data`` reads the file too), without a benchmark's extra
        # fields: one schema for lm-eval's JSON loader.
        rows = [
            {"id": r.id, "question": r.question, "steps": list(r.steps), "answer": r.answer} for r in records
        ]
        data = out_dir / "data" / f"{name}.jsonl"
        _write_if_changed(data, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        for suffix, text in (("", PLAIN_TEXT), ("_chat", CHAT_TEXT)):
            task = f"{TASK_PREFIX}{name}{suffix}"
            _write_if_changed(out_dir / f"{task}.yaml", _task_yaml(task, data.resolve(), text, max_gen_toks))
            written.append(task)
    for suffix in ("", "_chat"):
        members = [f"{TASK_PREFIX}{n}{suffix}" for n in DATA_PACK]
        if all(m in written for m in members):
            group = f"{TASK_PREFIX}math{suffix}"
            _write_if_changed(out_dir / f"{group}.yaml", _group_yaml(group, members))
            written.append(group)
    if names is None:
        written += _write_stock_gsm8k(out_dir)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ltscale.lmeval.tasks [DIR]``: write the task files (for plain ``lm_eval --include_path DIR``)."""
    p = argparse.ArgumentParser(prog="python -m ltscale.lmeval.tasks", description=main.__doc__)
    p.add_argument("out_dir", nargs="?", default=None, help=f"default: {default_tasks_dir()}")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="also a task ltscale_NAME for this record file (repeatable)",
    )
    args = p.parse_args(argv)
    files = dict(item.split("=", 1) for item in args.data if "=" in item)
    if len(files) != len(args.data):
        p.error("--data: expected NAME=FILE")
    out = Path(args.out_dir) if args.out_dir else default_tasks_dir()
    names = write_tasks(out, files=files)
    print(f"wrote {len(names)} lm-eval tasks to {out}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
