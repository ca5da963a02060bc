"""GSM8K-Aug as users get it: the hub's parquet copy (whynlp/gsm8k-aug), Coconut's JSON, the ICoT
text files and zen-E's ``cot`` column all load into the same records; ``gsm8k-calc`` gives the
same equation-only format offline. Every layout is a small local fixture written the way its
owner stores it; nothing touches the network."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ltscale.data import iter_records, load_records
from ltscale.data.records import LoadReport, load_records_with_report
from ltscale.data.sources import DataError, open_source, parse_icot_line

# Three problems in the ICoT text layout (lines of da03/Internalize_CoT_Step_by_Step's
# data/gsm8k/*.txt, as in the data pack's gsm8k_aug/raw_test.txt): equations, no annotation,
# a thousands separator in the answer.
ICOT = [
    "A set of 7 spoons costs $21. If each spoon would be sold separately, how much would 5 spoons cost?"
    "||<<21/7=3>> <<5*3=15>> #### 15",
    "Together, Alan and Marcy handed out 150 parking tickets. If Marcy handed out 6 fewer than 5 times as "
    "many tickets as Alan, how many tickets did Alan hand out?|| #### 26",
    "Johnny picks up 500 pieces, 3 times more, and 1/4 as many. How many blocks does he pick up?"
    "||<<500*3=1500>> <<500*.25=125>> <<500+1500+125=2125>> #### 2,125",
]
WANT = [
    (ICOT[0].split("||")[0], ("21/7=3", "5*3=15"), "15"),
    (ICOT[1].split("||")[0], (), "26"),
    (ICOT[2].split("||")[0], ("500*3=1500", "500*.25=125", "500+1500+125=2125"), "2125"),
]


def _coconut_rows(lines: list[str]) -> list[dict]:
    """Coconut's data/gsm_*.json layout: the ICoT line cut at ``||`` and ``##``, steps split on
    single spaces with their ``<<>>`` kept, the question unstripped."""
    rows = []
    for line in lines:
        question, rest = line.split("||")
        rows.append({"question": question, "steps": rest.split("##")[0].strip().split(" "),
                     "answer": rest.split("##")[-1].strip()})  # fmt: skip
    return rows


def _hub_dir(root, splits: dict[str, list[str]]):
    """whynlp/gsm8k-aug as the hub stores it (and ``snapshot_download`` copies it): parquet shards
    ``data/{split}-00000-of-00001.parquet`` with string ``question``, list<string> ``steps``
    (``<<...>>`` kept), string ``answer``."""
    schema = pa.schema([("question", pa.string()), ("steps", pa.list_(pa.string())), ("answer", pa.string())])
    (root / "data").mkdir(parents=True)
    for split, lines in splits.items():
        rows = _coconut_rows(lines)
        for r in rows:
            r["steps"] = [s for s in r["steps"] if s]  # the hub copy has no empty step strings
        pq.write_table(
            pa.Table.from_pylist(rows, schema=schema), root / "data" / f"{split}-00000-of-00001.parquet"
        )
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n---\n")
    return root


def _key(records):
    return [(r.question, r.steps, r.answer) for r in records]


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """Any hub access is a bug unless a test installs its own stand-in."""
    import datasets

    def refuse(*a, **k):
        raise AssertionError(f"load_dataset called with {a} {k}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


def test_every_gsm8k_aug_layout_gives_the_same_records(tmp_path):
    icot = tmp_path / "icot" / "train.txt"
    icot.parent.mkdir()
    icot.write_text("\n".join(ICOT) + "\n")
    coconut = tmp_path / "gsm_train.json"
    coconut.write_text(json.dumps(_coconut_rows(ICOT)))  # one line, as json.dump writes it
    hub = _hub_dir(tmp_path / "gsm8k-aug", {"train": ICOT, "validation": ICOT[:1]})
    zen = tmp_path / "zen.jsonl"
    zen.write_text("".join(json.dumps({"question": q, "cot": " ".join(f"<<{s}>>" for s in st), "answer": a}) + "\n"
                           for q, st, a in WANT))  # fmt: skip

    layouts = {
        "icot file": load_records(icot),
        "icot dir": load_records(icot.parent, split="train"),
        "coconut json": load_records(coconut),
        "hub parquet dir": load_records(hub, split="train"),
        "hub parquet file": load_records(hub / "data" / "train-00000-of-00001.parquet"),
        "zen cot": load_records(zen),
    }
    for name, recs in layouts.items():
        assert _key(recs) == WANT, name
    assert [r.id for r in layouts["hub parquet dir"]] == ["gsm8k-aug-train-00000", "gsm8k-aug-train-00001",
                                                          "gsm8k-aug-train-00002"]  # fmt: skip
    assert [r.id for r in layouts["icot file"]][:1] == ["train-00000"]
    assert _key(load_records(hub, split="validation")) == WANT[:1]
    with pytest.raises(DataError, match=r"no test\.jsonl or test\.json or data/test-\*\.parquet"):
        load_records(hub, split="test")


def test_hub_name_goes_through_datasets(tmp_path, monkeypatch):
    """``data.train: whynlp/gsm8k-aug`` on a cluster with network: ``datasets.load_dataset`` (here
    reading the same parquet layout locally) -> the same records and ids as a local copy."""
    import datasets
    from datasets.load import load_dataset as real_load  # the autouse guard replaced datasets.load_dataset

    hub = _hub_dir(tmp_path / "gsm8k-aug", {"train": ICOT})
    calls = []

    def fake(name, config=None, split=None):
        calls.append((name, config, split))
        files = {split: str(hub / "data" / f"{split}-00000-of-00001.parquet")}
        return real_load("parquet", data_files=files, split=split, cache_dir=str(tmp_path / "hf-cache"))

    monkeypatch.setattr(datasets, "load_dataset", fake)
    recs = load_records("whynlp/gsm8k-aug", split="train")
    assert calls == [("whynlp/gsm8k-aug", None, "train")]
    assert _key(recs) == WANT and recs == load_records(hub, split="train")
    src = open_source("whynlp/gsm8k-aug", "train")
    assert src.files and src.hub == {"dataset": "whynlp/gsm8k-aug", "config": None, "split": "train"}
    assert len(src.content_hash()) == 64


def test_real_icot_files_match_the_data_pack(data_dir):
    """The data pack's verbatim ICoT files load exactly as its normalized GSM8K-Aug files."""
    for split in ("valid", "test"):
        raw = load_records(data_dir / "gsm8k_aug" / f"raw_{split}.txt")
        norm = load_records(data_dir / "gsm8k_aug", split=split)
        assert len(raw) == len(norm) > 0
        assert _key(raw) == _key(norm), split


def test_gsm8k_calc_is_gsm8k_with_equation_steps(data_dir, monkeypatch):
    monkeypatch.setenv("LTSCALE_DATA_DIR", str(data_dir))
    calc = load_records("gsm8k-calc", split="test")
    norm = load_records(data_dir / "gsm8k", split="test")
    assert len(calc) == len(norm) == 1319
    for c, n in zip(calc, norm):
        assert (c.id, c.question, c.answer) == (n.id, n.question, n.answer)
        assert list(c.steps) == [s for s in n.extra["steps_calc"] if s.strip()]
        assert c.extra["steps_nl"] == list(n.steps) and "steps_calc" not in c.extra
    assert calc[0].steps == ("16-3-4=9", "9*2=18")
    assert sum(1 for _ in iter_records("gsm8k-calc", limit=10)) == 10  # split defaults to train
    monkeypatch.setenv("LTSCALE_DATA_DIR", str(data_dir / "nowhere"))
    with pytest.raises(DataError, match=r"gsm8k-calc: .*nowhere/gsm8k not found; set LTSCALE_DATA_DIR"):
        load_records("gsm8k-calc")


def test_bad_rows_name_file_and_line(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text(ICOT[0] + "\nno separator here #### 3\n" + "Q?||some words <<1+1=2>> #### 2\n")
    with pytest.raises(DataError, match=r"train\.txt:2: expected 'question\|\|<<steps>> #### answer'"):
        load_records(p)
    recs, report = load_records_with_report(p, strict=False)
    assert len(recs) == 1 and report.reasons == {"not ICoT text": 2}
    assert "train.txt:3: steps 'some words <<1+1=2>>' are not '<<...>>' equations" in report.first_errors[1]
    assert parse_icot_line("Q||<<1+1=2>>  <<2*2=4>>#### 4")["steps"] == ["<<1+1=2>>", "<<2*2=4>>"]

    arr = tmp_path / "gsm_train.json"
    arr.write_text('[\n  {"question": "Q", "steps": [], "answer": "1"},\n  {"question": "R", "steps": [}\n]')
    with pytest.raises(DataError, match=r"gsm_train\.json:3: malformed JSON: .* \(column \d+\)"):
        load_records(arr)
    arr.write_text('[{"question": "Q", "steps": [], "answer": "1"} {"question": "R"}]')
    with pytest.raises(DataError, match=r"gsm_train\.json:1: expected ',' or '\]'"):
        load_records(arr)
    arr.write_text('[{"question": "Q", "steps": [], "answer": "1"}')
    with pytest.raises(DataError, match="unterminated array"):
        load_records(arr)
    zen = tmp_path / "z.jsonl"
    zen.write_text(json.dumps({"question": "Q", "cot": 5, "answer": "1"}) + "\n")
    with pytest.raises(DataError, match=r"z\.jsonl:1: field 'cot' must be a string"):
        load_records(zen)


def test_json_array_streams_like_json_loads(tmp_path):
    rows = [{"question": f"Q{i}?", "steps": [f"<<{i}+1={i + 1}>>"], "answer": str(i + 1)} for i in range(5)]
    for text in (json.dumps(rows), json.dumps(rows, indent=2), json.dumps(rows, separators=(",", ":"))):
        p = tmp_path / "a.json"
        p.write_text(text)
        assert [(r.question, r.steps) for r in load_records(p)] == [
            (f"Q{i}?", (f"{i}+1={i + 1}",)) for i in range(5)
        ]
    p.write_text("[ ]")
    assert load_records(p) == []
    report = LoadReport(source="x")
    assert list(iter_records(p, report=report)) == [] and report.n_ok == 0
