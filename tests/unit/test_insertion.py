"""Confidence-driven insertion: gold probabilities, site selection rules, application, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ltscale.data import (
    IGNORE_INDEX,
    Encoded,
    InsertionParams,
    apply_insertions,
    gold_token_probs,
    insertion_fingerprint,
    load_insertions,
    save_insertions,
    select_sites,
)
from ltscale.data.arrow_store import StoreError
from ltscale.data.insertion import Sites, iter_gold_token_probs
from tests.helpers import make_tiny_llama

P = InsertionParams(tau=0.3, max_sites=6, insert_prob=0.85, double_insert_prob=0.15)


def _sel(probs, prompt_len=0, params=P, seed=0, sample_index=0, stage=2):
    return select_sites(
        np.asarray(probs), prompt_len, params, seed=seed, sample_index=sample_index, stage=stage
    )


def test_threshold_and_prompt_region():
    always = InsertionParams(tau=0.5, max_sites=100, insert_prob=1.0, double_insert_prob=0.0)
    probs = [np.nan, 0.1, 0.9, 0.49, 0.5, 0.2, 0.7, 0.0]
    assert _sel(probs, prompt_len=0, params=always) == [1, 3, 5, 7]
    assert _sel(probs, prompt_len=3, params=always) == [3, 5, 7]  # t == prompt_len allowed
    assert _sel(probs, prompt_len=4, params=always) == [5, 7]
    assert _sel([np.nan], params=always) == []
    assert _sel([np.nan, 0.9, 0.8], params=always) == []


def test_caps_and_doubles():
    rng = np.random.default_rng(0)
    doubles = 0
    for i in range(200):
        probs = rng.random(60)
        probs[0] = np.nan
        sites = _sel(probs, prompt_len=10, sample_index=i)
        assert sites == sorted(sites)
        distinct = set(sites)
        assert len(distinct) <= P.max_sites
        assert all(sites.count(t) <= 2 for t in distinct)
        assert all(t >= 10 and probs[t] < P.tau for t in distinct)
        doubles += len(sites) - len(distinct)
    assert doubles > 0  # double insertion happens (p=0.15 per kept site)


def test_all_candidates_taken_when_few():
    every = InsertionParams(tau=0.3, max_sites=8, insert_prob=1.0, double_insert_prob=1.0)
    assert _sel([np.nan, 0.1, 0.5, 0.2], params=every) == [1, 1, 3, 3]


def test_zero_probabilities_give_no_sites():
    probs = np.full(40, 0.01)
    assert _sel(probs, params=InsertionParams(0.3, 6, 0.0, 1.0)) == []
    assert _sel(probs, params=InsertionParams(0.3, 0, 1.0, 1.0)) == []
    assert _sel(probs, params=InsertionParams(0.0, 6, 1.0, 1.0)) == []
    with pytest.raises(ValueError):
        InsertionParams(0.3, 6, 1.5, 0.0)


def test_deterministic_and_seed_sensitive():
    probs = np.full(200, 0.05)
    base = _sel(probs, seed=1, sample_index=5, stage=2)
    assert base == _sel(probs, seed=1, sample_index=5, stage=2)
    others = [_sel(probs, seed=2, sample_index=5, stage=2), _sel(probs, seed=1, sample_index=6, stage=2)]
    others.append(_sel(probs, seed=1, sample_index=5, stage=3))
    assert all(o != base for o in others)


def test_apply_insertions_shifts_and_labels():
    ex = Encoded(
        input_ids=[1, 10, 11, 20, 21, 22, 2], labels=[-100, -100, -100, 20, 21, 22, 2], prompt_len=3, id="e"
    )
    out = apply_insertions(ex, [3, 3, 5], thinking_id=99)
    assert out.input_ids == [1, 10, 11, 99, 99, 20, 21, 99, 22, 2]
    assert out.labels == [-100, -100, -100, 99, 99, 20, 21, 99, 22, 2]
    assert out.prompt_len == 3 and out.id == "e"
    assert apply_insertions(ex, [], 99) == ex
    for bad in ([2], [7]):
        with pytest.raises(ValueError, match="outside the response"):
            apply_insertions(ex, bad, 99)


def _tiny_llama():
    return make_tiny_llama(
        kv_heads=2, dtype=torch.float32, max_positions=64, isolated_rng=False, record_dtype=False
    ).eval()


def test_gold_token_probs_match_per_example():
    model = _tiny_llama()
    rng = np.random.default_rng(0)
    examples = []
    for i, n in enumerate([5, 17, 9, 1, 12]):
        ids = rng.integers(4, 64, size=n).tolist()
        examples.append(Encoded(input_ids=ids, labels=list(ids), prompt_len=min(2, n), id=f"x{i}"))
    calls = []

    def fwd(input_ids, attention_mask):
        calls.append(tuple(input_ids.shape))
        assert torch.all(attention_mask[:, :-1] >= attention_mask[:, 1:])  # right padded
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.to(torch.bfloat16)

    got = gold_token_probs(fwd, examples, batch_size=2, pad_id=0)
    assert calls == [(2, 17), (2, 9), (1, 1)]  # longest first
    with torch.no_grad():
        for ex, p in zip(examples, got):
            assert p.shape == (len(ex.input_ids),) and np.isnan(p[0])
            ids = torch.tensor([ex.input_ids])
            logits = model(input_ids=ids).logits[0].to(torch.bfloat16).float()
            ref = torch.softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0].numpy()
            np.testing.assert_allclose(p[1:], ref, rtol=1e-4, atol=1e-6)
    # a model output object (with .logits) is accepted as well
    again = gold_token_probs(
        lambda i, m: model(input_ids=i, attention_mask=m), examples[:2], batch_size=4, pad_id=0
    )
    np.testing.assert_allclose(again[1], got[1], rtol=2e-2, atol=1e-4)


def test_fingerprint():
    fp = insertion_fingerprint(P, 0, 2, "examples-a")
    assert fp == insertion_fingerprint(P, 0, 2, "examples-a") and len(fp) == 64
    changed = [
        insertion_fingerprint(P, 1, 2, "examples-a"),
        insertion_fingerprint(P, 0, 3, "examples-a"),
        insertion_fingerprint(P, 0, 2, "examples-b"),
        insertion_fingerprint(InsertionParams(0.2, 6, 0.85, 0.15), 0, 2, "examples-a"),
        insertion_fingerprint(P, 0, 2, "examples-a", extra={"step": 10}),
    ]
    assert len({fp, *changed}) == len(changed) + 1


def test_sites_pack_merge_and_round_trip(tmp_path):
    lists = [[3, 3, 7], [], [12], [], [5, 9]]
    sites = Sites.from_lists(lists)
    assert sites.to_lists() == lists and sites.counts.tolist() == [3, 0, 1, 0, 2]
    # two ranks' shards (examples 0, 2, 4 and 1, 3) merge back into one table in example order
    parts = [(np.array(pos), Sites.from_lists([lists[i] for i in pos])) for pos in ([0, 2, 4], [1, 3])]
    merged = Sites.merge(5, [(pos, s.counts, s.values) for pos, s in parts])
    assert merged.to_lists() == lists
    with pytest.raises(ValueError, match="example 1 has no result"):
        Sites.merge(5, [(parts[0][0], parts[0][1].counts, parts[0][1].values)])

    path = tmp_path / "run" / "insertions-stage2"
    meta = {"fingerprint": insertion_fingerprint(P, 0, 2, "x"), "stage": 2}
    save_insertions(path, sites, meta)
    got, got_meta = load_insertions(path)
    assert got.to_lists() == lists and {k: got_meta[k] for k in meta} == meta and got_meta["rows"] == 5
    # overwrite atomically, no temp dirs left behind
    save_insertions(path, Sites.from_lists([[]]), {"stage": 3})
    got, got_meta = load_insertions(path)
    assert got.to_lists() == [[]] and got_meta["stage"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["insertions-stage2"]
    with pytest.raises(StoreError, match="no meta.json"):
        load_insertions(tmp_path / "nothing")
    # a table cut short after the write is an error naming the file, never fewer sites
    table = path / "table.arrow"
    table.write_bytes(table.read_bytes()[:-8])
    with pytest.raises(StoreError, match=r"table\.arrow: .* bytes, but meta\.json records"):
        load_insertions(path)


def test_streamed_probs_equal_the_list():
    model = _tiny_llama()
    rng = np.random.default_rng(1)
    examples = [Encoded(input_ids=rng.integers(4, 64, size=n).tolist(), labels=[], prompt_len=1, id=str(n))
                for n in (4, 9, 6, 9)]  # fmt: skip

    def fwd(i, m):
        return model(input_ids=i, attention_mask=m).logits

    want = gold_token_probs(fwd, examples, batch_size=2, pad_id=0)
    got = dict(iter_gold_token_probs(fwd, examples, batch_size=2, pad_id=0, lengths=[4, 9, 6, 9]))
    assert sorted(got) == [0, 1, 2, 3]
    for i, p in got.items():
        np.testing.assert_array_equal(p, want[i])


def test_end_to_end_pipeline_labels_only_in_response():
    ex = Encoded(
        input_ids=[1, 5, 6, 7, 8, 9, 2], labels=[IGNORE_INDEX] * 3 + [7, 8, 9, 2], prompt_len=3, id="q"
    )
    probs = np.array([np.nan, 0.01, 0.01, 0.01, 0.9, 0.01, 0.01])
    params = InsertionParams(tau=0.3, max_sites=8, insert_prob=1.0, double_insert_prob=0.0)
    sites = select_sites(probs, ex.prompt_len, params, seed=0, sample_index=0, stage=2)
    assert sites == [3, 5, 6]
    out = apply_insertions(ex, sites, 63)
    assert out.input_ids[: ex.prompt_len] == ex.input_ids[: ex.prompt_len]
    assert out.labels.count(63) == 3 and out.labels[: ex.prompt_len] == [IGNORE_INDEX] * 3
