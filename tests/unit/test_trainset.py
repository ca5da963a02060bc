"""The run's tokenized training set (RUN/data/train): the same examples as encoding the records
directly, built once and reused, rebuilt when data, tokenizer or formatting change, a damaged
table rebuilt, and the lazy stage views the trainer and the methods read."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from ltscale import rundir
from ltscale.data import (
    Examples,
    TrainSet,
    add_thinking_token,
    assistant_text,
    encode_example,
    encode_records,
    generate_problems,
    plain_prompt_text,
    train_sentencepiece,
)
from ltscale.data.arrow_store import StoreError
from ltscale.data.build import Ranks, id_type
from ltscale.data.insertion import apply_insertions
from ltscale.data.trainset import build_trainset, tokenizer_fingerprint
from ltscale.run_config import load_config
from ltscale.run_setup import load_split_records, prepare_data, prepare_train

RECS = generate_problems(60, seed=3)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = train_sentencepiece([plain_prompt_text(r.question) + assistant_text(r) for r in RECS],
                            tmp_path_factory.mktemp("tok"), vocab_size=200)  # fmt: skip
    add_thinking_token(t)
    return t


def _build(path, tok, recs=RECS, **kw):
    kw = {"fingerprint": "fp", "use_chat_template": None, "max_length": None, "strict": True} | kw
    build_trainset(path, iter(recs), tok, **kw)
    return TrainSet(path, fingerprint=kw["fingerprint"])


def test_rows_are_the_encoded_records(tmp_path, tok):
    train = _build(tmp_path / "t", tok)
    assert len(train) == len(RECS)
    for i, r in enumerate(RECS):
        assert train[i] == encode_example(tok, r)
        assert train.record(i) == type(r)(r.id, r.question, r.steps, r.answer)  # extra is not kept
    assert train.n_steps.tolist() == [len(r.steps) for r in RECS]
    assert train.lengths.tolist() == [len(e) for e in encode_records(tok, RECS)]
    assert train[-1] == train[len(RECS) - 1]
    with pytest.raises(IndexError):
        train[len(RECS)]
    # over-long examples: dropped (lenient) or named (strict), as encode_records does
    limit = int(np.median(train.lengths))
    kept = _build(tmp_path / "short", tok, max_length=limit, strict=False)
    assert [kept[i] for i in range(len(kept))] == encode_records(tok, RECS, max_length=limit, strict=False)
    with pytest.raises(Exception, match="exceeds max_length"):
        _build(tmp_path / "strict", tok, max_length=limit)
    assert not (tmp_path / "strict").exists()  # nothing half-written


def test_layout_and_id_width(tmp_path, tok):
    import pyarrow as pa

    train = _build(tmp_path / "t", tok)
    d = tmp_path / "t"
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "part-0", "records"]
    assert json.loads((d / "meta.json").read_text())["rows"] == len(RECS)
    assert train.input_ids(0).dtype == np.uint16  # 457 pieces: two bytes per token
    assert id_type(1 << 16) == pa.uint16() and id_type((1 << 16) + 1) == pa.int32()  # Llama 3: 128,256


def test_examples_views(tmp_path, tok):
    train = _build(tmp_path / "t", tok)
    used = np.array([2, 5, 7, 11])
    sub = train.select(used)
    assert [e.id for e in sub] == [RECS[i].id for i in used]
    assert sub.lengths().tolist() == train.lengths[used].tolist() and sub.max_latents() == 0
    assert sub.prompt_ids(1) == train[5].input_ids[: train[5].prompt_len] and sub.record(2) == train.record(7)
    think = 300
    sites = [[train[2].prompt_len], [], [train[7].prompt_len + 1] * 2, []]
    out = sub.map(lambda j, e: apply_insertions(e, sites[j], think), np.array([len(s) for s in sites]))
    assert out.max_latents() == 2 and out.latent_counts().tolist() == [1, 0, 2, 0]
    for j, i in enumerate(used):
        assert out[j] == apply_insertions(train[i], sites[j], think)
        assert out.at_train_index(int(i)) == out[j]
    with pytest.raises(KeyError, match="training example 3 is not among"):
        out.at_train_index(3)
    assert sub.fingerprint() == train.select(used).fingerprint() != train.select(used[:3]).fingerprint()
    listed = Examples.of([train[i] for i in used])  # a plain list works too (tests, small data)
    assert listed.lengths().tolist() == sub.lengths().tolist() and listed.prompt_len(0) == sub.prompt_len(0)


def _cfg(tmp_path, data_file, *more):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.train={data_file}", "data.train_split=null",
                              "data.eval=synthetic", "data.synthetic.n_test=4", "model.tokenizer_vocab_size=120",
                              *more])  # fmt: skip


def _prepare(cfg, tok):
    return prepare_train(cfg, Path(cfg.run_dir), tok)


def test_built_once_reused_and_rebuilt_on_any_change(tmp_path, tok, caplog):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in RECS[:40]))
    cfg = _cfg(tmp_path, data)
    caplog.set_level(logging.INFO, logger="ltscale.run_setup")
    first = _prepare(cfg, tok)
    table = rundir.train_data_dir(cfg.run_dir) / "part-0" / "table.arrow"
    stamp = table.stat().st_mtime_ns
    assert "tokenizing into" in caplog.text and len(first) == 40
    caplog.clear()
    again = _prepare(cfg, tok)
    assert "reusing" in caplog.text and table.stat().st_mtime_ns == stamp  # a restart does no data work
    assert again.fingerprint == first.fingerprint

    def rebuilt(cfg_, tok_=tok):
        caplog.clear()
        out = _prepare(cfg_, tok_)
        assert "tokenizing into" in caplog.text
        return out

    data.write_text(data.read_text().replace(RECS[0].question, RECS[0].question + " Really?"))
    assert rebuilt(cfg)[0].input_ids != first[0].input_ids  # same size and ids, new bytes
    assert len(rebuilt(_cfg(tmp_path, data, "data.train_limit=10"))) == 10
    limit = int(np.max(first.lengths)) - 1
    assert len(rebuilt(_cfg(tmp_path, data, f"data.max_length={limit}", "data.strict=false"))) < 40
    other = copy.deepcopy(tok)
    add_thinking_token(other, "<extra>")
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    rebuilt(cfg, other)
    # a damaged table is rebuilt by rank 0 ...
    before = _prepare(cfg, tok).fingerprint
    table.write_bytes(table.read_bytes()[:100])
    assert rebuilt(cfg).fingerprint == before
    # ... and any rank handed another fingerprint than the table's stops naming the directory
    with pytest.raises(StoreError, match=r"data/train: built from other data, tokenizer or formatting"):
        TrainSet(rundir.train_data_dir(cfg.run_dir), fingerprint="0" * 64)


def test_a_rank0_failure_reaches_every_rank(tmp_path, tok):
    cfg = _cfg(tmp_path, tmp_path / "missing.jsonl")
    with pytest.raises(Exception, match="missing.jsonl: no such file"):
        _prepare(cfg, tok)
    shared = []

    def broadcast(x):  # what rank 0 broadcast: its error, no fingerprint
        shared.append(x)
        return (None, "DataError: missing.jsonl: no such file or directory")

    rank1 = Ranks(rank=1, world=2, broadcast=broadcast, all_gather=lambda x: [x, x])
    with pytest.raises(Exception, match="rank 0 could not prepare the training data: DataError: missing"):
        prepare_train(cfg, tmp_path / "run", tok, ranks=rank1)
    assert shared == [(None, None)]  # a non-zero rank reads nothing and offers nothing


def test_tiny_default_trains_on_exactly_the_directly_encoded_records(tmp_path, repo_root):
    """The tiny default's sequences through the run-dir table equal encoding its records directly
    (what training read before the table existed): same ids, labels and order."""
    cfg = load_config(
        repo_root / "configs" / "tiny.yaml", [f"run_dir={tmp_path / 'run'}", "data.synthetic.n_train=300"]
    )
    data = prepare_data(cfg, tmp_path / "run")
    direct = encode_records(data.tokenizer, load_split_records(cfg, "train"),
                            max_length=cfg.data.max_length, strict=cfg.data.strict)  # fmt: skip
    assert len(data.train) == len(direct) == 300
    assert [data.train[i] for i in range(len(direct))] == direct
    assert len(data.eval_records) == cfg.data.synthetic.n_test
