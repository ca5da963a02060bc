"""Record loading: both input formats, validation errors naming file:line, lenient mode, real data."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ltscale.data import collate, encode_records, generate_problems, plain_prompt_text
from ltscale.data import records as records_mod
from ltscale.data.formatting import assistant_text
from ltscale.data.records import (
    DataError,
    Record,
    load_records,
    load_records_with_report,
    normalize_answer,
)
from tests.helpers import launch_env

REPO_ROOT = Path(__file__).resolve().parents[2]


def _write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {
    "id": "a",
    "question": "Tom has 2 apples. He buys 3 more. How many?",
    "steps": ["2+3=5"],
    "answer": "5",
}


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """Any hub access in these tests is a bug (local paths must never touch the network)."""
    import datasets

    def refuse(*a, **k):
        raise AssertionError(f"load_dataset called with {a} {k}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


def test_record_format_and_extra(tmp_path):
    p = _write_lines(
        tmp_path / "d.jsonl",
        [GOOD, {"id": "b", "question": " Q? ", "steps": ["x ", ""], "answer": "$1,080.", "grade": 3}, ""],
    )
    recs = load_records(str(p))
    assert recs[0] == Record("a", GOOD["question"], ("2+3=5",), "5")
    assert recs[1].question == "Q?" and recs[1].steps == ("x",) and recs[1].answer == "1080"
    assert recs[1].extra == {"grade": 3} and recs[1].difficulty == 1
    assert hash(recs[1]) == hash(Record("b", "Q?", ["x"], "1080", {"grade": 3}))
    assert load_records(p, limit=1) == recs[:1]
    # to_dict round trip
    again = _write_lines(tmp_path / "again.jsonl", [r.to_dict() for r in recs])
    assert load_records(again) == recs


def test_gsm8k_form(tmp_path):
    row = {
        "question": "Q?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips.\n\nThen 48+24 = <<48+24=72>>72.\n#### 1,072",
    }
    p = _write_lines(tmp_path / "raw_test.jsonl", [row, row | {"id": "x"}])
    r0, r1 = load_records(p)
    assert r0.id == "raw_test-00000" and r1.id == "x"
    assert r0.steps == ("Natalia sold 48/2 = 24 clips.", "Then 48+24 = 72.")
    assert r0.answer == "1072" and r0.extra["steps_calc"] == ["48/2=24", "48+24=72"]


def test_directory_resolution(tmp_path):
    _write_lines(tmp_path / "train.jsonl", [GOOD])
    _write_lines(tmp_path / "all.jsonl", [GOOD | {"id": "z"}])
    assert load_records(tmp_path, split="train")[0].id == "a"
    assert load_records(tmp_path, split="test")[0].id == "z"  # falls back to all.jsonl
    assert load_records(str(tmp_path))[0].id == "z"
    (tmp_path / "all.jsonl").unlink()
    with pytest.raises(DataError, match=r"no test\.jsonl.*present: train\.jsonl"):
        load_records(tmp_path, split="test")


def test_json_array_file(tmp_path):
    p = tmp_path / "gsm_train.json"
    p.write_text(json.dumps([GOOD, GOOD | {"id": "b", "answer": "five"}], indent=1))
    with pytest.raises(DataError, match=r"gsm_train\.json\[1\]: answer 'five' is not a number"):
        load_records(p)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"id": "b", "question": "Q", "steps": [], "answer": "1"', "malformed JSON"),
        (json.dumps({"id": "b", "steps": [], "answer": "1"}), "missing field 'question'"),
        (json.dumps({"id": "b", "question": "Q", "steps": []}), "missing field 'answer'"),
        (json.dumps({"id": "b", "question": "Q", "answer": "1"}), "missing field 'steps'"),
        (
            json.dumps({"id": "b", "question": "Q", "steps": "1+1=2", "answer": "2"}),
            "field 'steps' must be a list",
        ),
        (
            json.dumps({"id": "b", "question": 7, "steps": [], "answer": "2"}),
            "field 'question' must be a string",
        ),
        (json.dumps({"id": "b", "question": "  ", "steps": [], "answer": "2"}), "empty question"),
        (
            json.dumps({"id": "b", "question": "Q", "steps": [], "answer": "two"}),
            "answer 'two' is not a number",
        ),
        (json.dumps({"question": "Q", "answer": "x\n#### 3 apples"}), "answer ' 3 apples' is not a number"),
        (json.dumps(["not", "an", "object"]), "expected a JSON object"),
        (json.dumps(GOOD), "duplicate id 'a' \\(first at .*d.jsonl:1\\)"),
    ],
)
def test_strict_errors_name_file_and_line(tmp_path, line, reason):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(DataError, match=rf"d\.jsonl:3: {reason}"):
        load_records(p)


def test_lenient_skips_and_reports(tmp_path, caplog):
    p = _write_lines(
        tmp_path / "d.jsonl",
        [GOOD, "{oops", GOOD, GOOD | {"id": "c", "answer": "n/a"}, GOOD | {"id": "d"}],
    )
    with caplog.at_level(logging.WARNING, logger="ltscale.data.records"):
        recs, report = load_records_with_report(p, strict=False)
    assert [r.id for r in recs] == ["a", "d"]
    assert (report.n_ok, report.n_skipped) == (2, 3)
    assert report.reasons == {"malformed JSON": 1, "duplicate id": 1, "non-numeric answer": 1}
    assert "skipped 3 of 5 rows" in caplog.text and "d.jsonl:2" in caplog.text
    assert load_records(p, strict=False) == recs


def test_missing_local_path_never_hits_hub(tmp_path):
    for src in [str(tmp_path / "nope.jsonl"), "./missing.json", "/abs/dir", tmp_path / "x"]:
        with pytest.raises(DataError, match="no such file"):
            load_records(src)


def test_hub_name_and_config(monkeypatch):
    import datasets

    calls = []

    def fake(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(
            [{"question": "Q1", "answer": "a\n#### 4"}, {"question": "", "answer": "#### 1"}]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    recs, report = load_records_with_report("openai/gsm8k:main", split="test", strict=False)
    assert calls == [("openai/gsm8k", "main", "test")]
    assert recs[0].id == "gsm8k-test-00000" and recs[0].answer == "4"
    assert report.n_skipped == 1
    with pytest.raises(DataError, match=r"openai/gsm8k\[train\] row 1: empty question"):
        load_records("openai/gsm8k")
    assert calls[-1] == ("openai/gsm8k", None, "train")


def test_normalize_answer():
    assert normalize_answer(" $1,234. ") == "1234"
    assert normalize_answer("18.0") == "18.0"
    assert normalize_answer("-3") == "-3"


def test_real_data_files_load(data_dir):
    d = data_dir
    expected = {
        "gsm8k/train.jsonl": 7473,
        "gsm8k/test.jsonl": 1319,
        "gsm8k_aug/valid.jsonl": 500,
        "gsm8k_aug/test.jsonl": 1319,
        "svamp/all.jsonl": 1000,
        "asdiv/all.jsonl": 2159,
    }
    for rel, n in expected.items():
        recs = load_records(d / rel)
        assert len(recs) == n, rel
    assert load_records(d / "svamp", split="test")[0].extra["type"]


def test_real_raw_gsm8k_matches_normalized(data_dir):
    d = data_dir
    raw = load_records(d / "gsm8k" / "raw_test.jsonl")
    norm = load_records(d / "gsm8k", split="test")
    assert len(raw) == len(norm) == 1319
    for a, b in zip(raw, norm):
        assert (a.question, a.steps, a.answer) == (b.question, b.steps, b.answer), b.id
        assert a.extra["steps_calc"] == b.extra["steps_calc"], b.id


def test_loading_local_records_imports_no_network_client(tmp_path):
    """``datasets`` (and every hub/HTTP client) is imported only for hub names: a fresh interpreter
    that imports the module and loads a local file has none of them in ``sys.modules``."""
    path = _write_lines(tmp_path / "r.jsonl", [GOOD])
    code = (
        "import sys\n"
        f"from {records_mod.__name__} import load_records\n"
        f"assert len(load_records({str(path)!r})) == 1\n"
        "clients = ('datasets', 'huggingface_hub', 'requests', 'urllib3', 'httpx', 'aiohttp', 'fsspec')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in clients))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=launch_env(REPO_ROOT))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ fuzzing (issue 9)


# Any text, special-token spellings included (formatting encodes them as plain text).
_TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
    st.sampled_from(["<thinking>", "a </s> b", "<s>", "<pad><unk>", "x<thinking>y"]),
)
_QUESTION = _TEXT.filter(lambda s: s.strip())
_GOOD_ANSWER = st.one_of(
    st.integers(-(10**9), 10**9),
    st.integers(-(10**9), 10**9).map(str),
    st.integers(0, 10**6).map(lambda i: f"${i:,}"),
    st.integers(-(10**4), 10**4).map(lambda i: f"{i / 100:.2f}"),
)
_BAD_ANSWER = st.one_of(
    st.sampled_from(["two", "3 apples", "٣", "３", "½", "1e5", "∞", "NaN", "--3", "1.2.3", "四", "0x1F"]),
    st.text(st.characters(whitelist_categories=("Lu", "Ll", "Lo", "So")), min_size=1, max_size=10),
)
_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=6,
)
_HUGE_STEP = st.integers(200, 2000).map(lambda n: "1+1=2 " * n)


@st.composite
def _good_row(draw, idx: int) -> dict:
    row = {
        "id": f"g{idx}",
        "question": draw(_QUESTION),
        "steps": draw(st.lists(_TEXT | _HUGE_STEP, max_size=4)),
        "answer": draw(_GOOD_ANSWER),
    }
    row.update(
        draw(st.dictionaries(st.sampled_from(["grade", "type", "source", "notes"]), _ANY_JSON, max_size=2))
    )
    return row


@st.composite
def _bad_line(draw, idx: int) -> bytes:
    """One line the loader must reject (never crash on, never accept)."""
    good = draw(_good_row(idx))
    kind = draw(st.sampled_from(
        ["json", "utf8", "missing", "type", "empty_q", "answer", "unicode_digits", "surrogate", "not_object",
         "id_type"]))  # fmt: skip
    if kind == "json":
        text = json.dumps(good)
        return text[: draw(st.integers(1, len(text) - 1))].encode()
    if kind == "utf8":
        return json.dumps(good).encode()[:-1] + b"\xff\xfe}"
    if kind == "missing":
        del good[draw(st.sampled_from(["question", "answer"]))]
    elif kind == "type":
        field = draw(st.sampled_from(["question", "steps", "answer"]))
        bad = {"question": st.integers() | st.lists(_TEXT) | st.none(),
               "steps": _TEXT | st.integers() | st.lists(st.integers(), min_size=1) | st.none(),
               "answer": st.lists(st.integers()) | st.none() | st.booleans() | st.dictionaries(_TEXT, _TEXT)}  # fmt: skip
        good[field] = draw(bad[field])
    elif kind == "empty_q":
        good["question"] = draw(st.sampled_from(["", " ", "\n\t"]))
    elif kind == "answer":
        good["answer"] = draw(_BAD_ANSWER)
    elif kind == "unicode_digits":  # numbers to a human, never equal to a model's ASCII "3"
        good["answer"] = draw(st.sampled_from(["٣", "３", "۳", "३", "①", "-٣٤", "1٣"]))
    elif kind == "surrogate":
        good[draw(st.sampled_from(["question", "answer"]))] = "12\ud800"
    elif kind == "not_object":
        return json.dumps(draw(st.lists(_ANY_JSON, max_size=3) | st.integers() | _TEXT)).encode()
    elif kind == "id_type":
        good["id"] = draw(st.lists(st.integers(), max_size=2) | st.booleans() | st.floats(allow_nan=False))
    return json.dumps(good).encode()


@st.composite
def _jsonl(draw) -> tuple[list[bytes], list[bool]]:
    """Lines of a JSONL file and, per line, whether it is good."""
    is_good = draw(st.lists(st.booleans(), min_size=4, max_size=12))
    lines = [
        json.dumps(draw(_good_row(i))).encode() if ok else draw(_bad_line(i)) for i, ok in enumerate(is_good)
    ]
    return lines, is_good


@pytest.fixture(scope="module")
def fuzz_tok(tmp_path_factory):
    from ltscale.data import add_thinking_token, train_sentencepiece

    recs = generate_problems(200, seed=0)
    tok = train_sentencepiece([plain_prompt_text(r.question) + assistant_text(r) for r in recs],
                              tmp_path_factory.mktemp("tok"), vocab_size=200)  # fmt: skip
    add_thinking_token(tok, "<thinking>")
    return tok


# derandomize: CI sees the same 60 files every run (a fuzz failure must reproduce, not flake).
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(data=_jsonl())
def test_fuzz_jsonl_strict_names_first_bad_line_lenient_counts_all(data, tmp_path_factory, fuzz_tok, caplog):
    lines, is_good = data
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    n_bad = is_good.count(False)

    # strict: the first bad line is named with file:line and a reason; all-good files load fully
    if n_bad:
        first = is_good.index(False) + 1
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{first}: \S"):
            load_records(path)
    else:
        assert len(load_records(path)) == len(lines)

    # lenient: every bad line skipped and counted, every good one kept, a summary is logged
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ltscale.data.records"):
        recs, report = load_records_with_report(path, strict=False)
    assert [r.id for r in recs] == [f"g{i}" for i, ok in enumerate(is_good) if ok]
    assert (report.n_ok, report.n_skipped, sum(report.reasons.values())) == (len(recs), n_bad, n_bad)
    if n_bad:
        assert f"skipped {n_bad} of {len(lines)} rows" in caplog.text

    # what survives must tokenize and batch: over-long ones are dropped (lenient) or named (strict)
    encoded = encode_records(fuzz_tok, recs, max_length=96, strict=False)
    assert all(len(e.input_ids) <= 96 for e in encoded)
    thinking = fuzz_tok.convert_tokens_to_ids("<thinking>")
    assert not any(thinking in e.input_ids for e in encoded), "data text became a latent slot"
    if encoded:
        batch = collate(encoded, pad_id=fuzz_tok.pad_token_id)
        assert batch["input_ids"].shape[0] == len(encoded)
    if len(encoded) < len(recs):
        with pytest.raises(DataError, match=r"max_length"):
            encode_records(fuzz_tok, recs, max_length=96, strict=True)


def test_lone_surrogate_and_bad_bytes_are_row_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"id": "b", "question": "\xff"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid UTF-8"):
        load_records(p)
    p.write_text(json.dumps(GOOD | {"id": "c", "steps": ["x\ud800"]}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'steps\[0\]' is not valid Unicode"):
        load_records(p)
    p.write_text(json.dumps(GOOD | {"answer": "３"}) + "\n")  # full-width digit: not an ASCII number
    with pytest.raises(DataError, match="is not a number"):
        load_records(p)
    (tmp_path / "a.json").write_bytes(b'[{"question": "\xff"}]')
    with pytest.raises(DataError, match=r"a\.json: invalid UTF-8"):
        load_records(tmp_path / "a.json")
