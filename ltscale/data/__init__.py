"""Data: sources and records (loading/validation), synthetic problems, tokenizer, formatting, the
run's tokenized training set, insertion, collation.

Flow: ``iter_records`` / ``synthetic_splits`` -> ``encode_batches`` (prompt + "## Step i: ..." +
eos, prompt labels masked) -> ``build_trainset`` (once per run, memory-mapped as ``TrainSet``) ->
for latent stages ``gold_token_probs`` -> ``select_sites`` -> ``apply_insertions`` (sites persisted
with ``save_insertions``) -> ``collate``.
"""

from .collate import collate
from .formatting import (
    IGNORE_INDEX,
    Encoded,
    assistant_text,
    encode_batches,
    encode_example,
    encode_plain,
    encode_records,
    plain_prompt_text,
    prompt_ids,
)
from .insertion import (
    InsertionParams,
    apply_insertions,
    gold_token_probs,
    insertion_fingerprint,
    load_insertions,
    save_insertions,
    select_sites,
)
from .records import (
    DataError,
    LoadReport,
    Record,
    iter_records,
    load_records,
    load_records_with_report,
    normalize_answer,
    record_from_dict,
)
from .synthetic import generate_problems, synthetic_splits
from .tokenizer import add_thinking_token, load_tokenizer, train_sentencepiece
from .trainset import Examples, TrainSet, build_trainset

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "Encoded",
    "Examples",
    "InsertionParams",
    "LoadReport",
    "Record",
    "TrainSet",
    "add_thinking_token",
    "apply_insertions",
    "assistant_text",
    "build_trainset",
    "collate",
    "encode_batches",
    "encode_example",
    "encode_plain",
    "encode_records",
    "generate_problems",
    "gold_token_probs",
    "insertion_fingerprint",
    "iter_records",
    "load_insertions",
    "load_records",
    "load_records_with_report",
    "load_tokenizer",
    "normalize_answer",
    "plain_prompt_text",
    "prompt_ids",
    "record_from_dict",
    "save_insertions",
    "select_sites",
    "synthetic_splits",
    "train_sentencepiece",
]
