"""evaluate(): decoding order, decoding of latent steps, exact sharding, summaries, output files.

Uses a fake decoding (``FakeInference``, the interface of ``ltscale.inference.Inference``) whose
``generate_many`` returns scripted tokens per question and a tiny WordLevel tokenizer, so the test
does not depend on the model package.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ltscale.eval.evaluate import (
    EvalSummary,
    decode_generated,
    evaluate,
    examples_path,
    format_table,
    merge_results,
    summarize,
    write_results,
)
from ltscale.inference import inference_for
from tests.helpers import make_tiny_llama

WORDS = [
    "[PAD]",
    "[UNK]",
    "</s>",
    "<thinking>",
    "Q:",
    "A:",
    "####",
    "Step",
    "the",
    "answer",
    "is",
    "-3",
    "18",
    "18.0",
    "7",
    "1,000",
]
WORDS += [f"q{i}" for i in range(12)] + ["long", "question", "words"]


def make_tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", eos_token="</s>", unk_token="[UNK]"
    )


@dataclass(frozen=True)
class FakeRecord:
    id: str
    question: str
    steps: tuple[str, ...]
    answer: str
    extra: dict = field(default_factory=dict)

    @property
    def difficulty(self) -> int:
        return len(self.steps)


def prompt_fn(tokenizer, question: str) -> list[int]:
    return tokenizer.encode(f"Q: {question} A:", add_special_tokens=False)


class FakeInference:
    """Scripted decoding: the first prompt word ``qN`` selects the output word list."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, script: dict[str, str]) -> None:
        self.tokenizer = tokenizer
        self.script = script
        self.thinking_token_id = tokenizer.convert_tokens_to_ids("<thinking>")
        self.calls: list[dict] = []

    def prompt_ids(self, question: str) -> list[int]:
        return prompt_fn(self.tokenizer, question)

    def generate_many(
        self, prompts, max_new_tokens, *, slots, eos_token_id, pad_token_id=None, without_thinking=False,
        on_finish=None,
    ):  # fmt: skip
        self.calls.append({"prompts": [list(p) for p in prompts], "slots": slots})
        rows, nlat, lens = [], [], []
        for ids in prompts:
            key = next(w for w in self.tokenizer.convert_ids_to_tokens(list(ids)) if w in self.script)
            words = self.script[key].split()
            if without_thinking:
                words = [w for w in words if w != "<thinking>"]
            out = self.tokenizer.convert_tokens_to_ids(words)[:max_new_tokens]
            if len(out) < max_new_tokens and eos_token_id is not None:
                out.append(eos_token_id)
            rows.append(out)
            nlat.append(sum(t == self.thinking_token_id for t in out))
            lens.append(len(out))
            if on_finish is not None:
                on_finish(1)
        seq = torch.full((len(rows), max_new_tokens), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            seq[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return SimpleNamespace(sequences=seq, num_latent=torch.tensor(nlat), lengths=torch.tensor(lens))


SCRIPT = {
    "q0": "Step 7 <thinking> #### 18",  # correct
    "q1": "Step <thinking> <thinking> #### 18.0",  # numeric-only correct
    "q2": "Step 7 #### 7",  # wrong
    "q3": "#### -3",  # correct, negative
    "q4": "Step <thinking> the answer is 1,000",  # no '#': official fails, numeric finds 1000
    "q5": "Step Step Step Step Step Step Step Step Step Step Step Step",  # truncated at 8
    "q6": "#### 18",
}
GOLD = {"q0": "18", "q1": "18", "q2": "18", "q3": "-3", "q4": "1000", "q5": "18", "q6": "18"}


def make_records(n: int = 7) -> list[FakeRecord]:
    recs = []
    for i in range(n):
        q = f"q{i % 7}" + " long question words" * (i % 3)  # varied prompt lengths
        recs.append(FakeRecord(id=f"r{i}", question=q, steps=("s",) * (1 + i % 2), answer=GOLD[f"q{i % 7}"]))
    return recs


def run(records, world_size=1, rank=0, batch_size=3, **kw):
    inf = FakeInference(make_tokenizer(), SCRIPT)
    summary, ex = evaluate(
        inf,
        records,
        batch_size=batch_size,
        max_new_tokens=8,
        progress=False,
        rank=rank,
        world_size=world_size,
        **kw,
    )
    return summary, ex, inf


def test_per_example_fields_and_metrics() -> None:
    records = make_records(7)
    summary, ex, model = run(records)
    assert [e["id"] for e in ex] == [r.id for r in records]  # original order restored
    assert [e["index"] for e in ex] == list(range(7))
    by_id = {e["id"]: e for e in ex}
    assert by_id["r0"]["prediction"] == "18" and by_id["r0"]["correct"] and by_id["r0"]["correct_numeric"]
    assert by_id["r0"]["num_latent"] == 1 and by_id["r0"]["num_generated"] == 6  # 5 tokens + EOS
    assert "<thinking>" in by_id["r0"]["generated_text"] and "</s>" not in by_id["r0"]["generated_text"]
    assert (
        by_id["r1"]["prediction"] == "18.0" and not by_id["r1"]["correct"] and by_id["r1"]["correct_numeric"]
    )
    assert by_id["r1"]["num_latent"] == 2
    assert not by_id["r2"]["correct"] and not by_id["r2"]["correct_numeric"]
    assert by_id["r3"]["correct"] and by_id["r3"]["gold"] == "-3"
    assert by_id["r4"]["prediction"].split() == ["Step", "the", "answer", "is", "1000"]
    assert not by_id["r4"]["correct"] and by_id["r4"]["correct_numeric"]
    assert by_id["r5"]["truncated"] and by_id["r5"]["num_generated"] == 8 and not by_id["r0"]["truncated"]
    for e in ex:
        assert set(e) >= {
            "id", "question", "gold", "prediction", "correct", "correct_numeric",
            "num_latent", "num_generated", "difficulty", "generated_text",
        }  # fmt: skip
    assert summary.n == 7
    assert summary.accuracy_official == pytest.approx(3 / 7)  # r0, r3, r6
    assert summary.accuracy_numeric == pytest.approx(5 / 7)  # + r1, r4
    assert summary.mean_latent_tokens == pytest.approx((1 + 2 + 1) / 7)
    assert summary.num_truncated == 1
    assert set(summary.by_difficulty) == {1, 2}
    assert summary.by_difficulty[1]["n"] == 4 and summary.by_difficulty[2]["n"] == 3
    # one decode of the whole shard, batch_size rows in flight, longest prompts first
    (call,) = model.calls
    assert call["slots"] == 3
    widths = [len(p) for p in call["prompts"]]
    assert widths == sorted(widths, reverse=True) and len(widths) == 7


def test_restores_train_mode() -> None:
    lm = real_lm()
    lm.train()
    evaluate(inference_for(lm, make_tokenizer()), make_records(3), progress=False, max_new_tokens=4)
    assert lm.training is True
    lm.eval()
    evaluate(inference_for(lm, make_tokenizer()), make_records(3), progress=False, max_new_tokens=4)
    assert lm.training is False


def test_without_thinking_is_forwarded() -> None:
    summary, ex, _ = run(make_records(7), without_thinking=True)
    assert summary.mean_latent_tokens == 0
    assert all("<thinking>" not in e["generated_text"] for e in ex)


@pytest.mark.parametrize("n", [7, 8, 1])
def test_sharding_world2_matches_single_rank(n: int) -> None:
    records = make_records(n)
    single, single_ex, _ = run(records, batch_size=2)
    shards = []
    for rank in range(2):
        _, ex, model = run(records, world_size=2, rank=rank, batch_size=2)
        assert [e["index"] for e in ex] == list(range(rank, n, 2))
        # a rank decodes exactly its shard: no padding, no duplicates, no filler prompts
        assert sorted(map(len, model.calls[0]["prompts"])) == sorted(
            len(model.prompt_ids(r.question)) for r in records[rank::2]
        )
        shards.append(ex)
    merged = merge_results(shards)
    assert sorted(e["index"] for e in shards[0] + shards[1]) == list(range(n))  # each exactly once
    assert merged == single_ex
    assert summarize(shards[0] + shards[1]) == single
    assert summarize(shards[1] + shards[0]) == single


def test_summarize_dedups_and_empty() -> None:
    _, ex, _ = run(make_records(4))
    assert summarize(ex + ex[:2]) == summarize(ex)
    empty = summarize([])
    assert empty.n == 0 and empty.accuracy_official == 0.0 and empty.by_difficulty == {}


def test_invalid_rank() -> None:
    with pytest.raises(ValueError):
        run(make_records(2), world_size=2, rank=2)


def test_decode_generated_paths() -> None:
    tok = make_tokenizer()
    ids = tok.convert_tokens_to_ids(["Step", "<thinking>", "####", "7"])
    think = tok.convert_tokens_to_ids("<thinking>")
    assert decode_generated(tok, ids, think) == "Step <thinking> #### 7"
    # a placeholder spelled differently in the vocabulary is still rendered as <thinking>
    words = [w if w != "<thinking>" else "<lat>" for w in WORDS]
    tok2 = make_tokenizer(words)
    assert decode_generated(tok2, ids, think) == "Step<thinking>#### 7"
    assert decode_generated(tok2, [], think) == ""


def test_write_results_round_trip(tmp_path) -> None:
    summary, ex, _ = run(make_records(7))
    out = tmp_path / "sub" / "results.json"
    paths = write_results(summary, ex, out, meta={"checkpoint": "x"})
    assert paths == (out, tmp_path / "sub" / "results.examples.jsonl") and examples_path(out) == paths[1]
    data = json.loads(out.read_text())
    assert data["meta"] == {"checkpoint": "x"}
    assert EvalSummary.from_dict(data) == summary
    lines = [json.loads(line) for line in paths[1].read_text().splitlines()]
    assert lines == ex
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["results.examples.jsonl", "results.json"]


def test_scalars_and_format_table() -> None:
    summary, _, _ = run(make_records(7))
    sc = summary.scalars("eval/synth")
    assert sc["eval/synth/accuracy"] == summary.accuracy_official
    table = format_table([{"stage": 1, **summary.to_dict()}, {"stage": 2, "accuracy_official": 0.5}])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| stage")
    assert "42.86" in lines[2] and "71.43" in lines[2]
    assert lines[3].count("-") >= 3  # missing values
    assert len({len(line) for line in lines}) == 1  # aligned


def test_prompts_come_from_the_formatting_module() -> None:
    """The real decoding's prompts (``Inference.prompt_ids``: ``data.formatting.prompt_ids``)."""
    from ltscale.data.formatting import prompt_ids

    tok = make_tokenizer()
    inf = inference_for(real_lm(), tok, chat=False)
    assert inf.prompt_ids("q3 words") == prompt_ids(tok, "q3 words", use_chat_template=False)
    fake = FakeInference(tok, SCRIPT)
    fake.prompt_ids = inf.prompt_ids
    summary, ex = evaluate(fake, make_records(3), progress=False, max_new_tokens=8)
    assert summary.n == 3 and [e["prediction"] for e in ex] == ["18", "18.0", "7"]


def real_lm():
    """A real LatentLM (tiny random Llama, fp64, fusion) over the test vocabulary, <thinking> made likely."""
    import ltscale.model as model_pkg

    tok = make_tokenizer()
    base = make_tiny_llama(len(WORDS), kv_heads=2, max_positions=64, isolated_rng=False, record_dtype=False)
    think = tok.convert_tokens_to_ids("<thinking>")
    with torch.no_grad():  # make <thinking> likely so latent steps are exercised
        base.lm_head.weight[think] += 0.5 * base.lm_head.weight.abs().mean(dim=0).sign()
    return model_pkg.LatentLM(base, think, mode="fusion")


def test_real_latent_lm_batched_equals_one_by_one() -> None:
    """Against the real LatentLM: the eval loop's length-sorted continuous batching gives the same
    per-example results as batch size 1."""
    inf = inference_for(real_lm(), make_tokenizer())
    records = make_records(5)
    kw = {"max_new_tokens": 6, "progress": False}
    _, batched = evaluate(inf, records, batch_size=3, **kw)
    _, single = evaluate(inf, records, batch_size=1, **kw)
    assert batched == single
    assert all(e["num_generated"] >= 1 for e in batched)
    assert any(e["num_latent"] for e in batched), "test is vacuous: no latent step was taken"


# ------------------------------------------------------------------- benchmarks through `ltscale eval`


def fake_load_for_inference(calls: list | None = None, made: list | None = None):
    """A stand-in for ``ltscale.inference.load_for_inference`` returning the scripted decoding;
    records what it was asked for in ``calls`` and what it returned in ``made``."""
    tok = make_tokenizer()

    def load(path, method=None, options=None, *, mode=None, device=None, dtype=None, chat=None, cfg=None):
        inf = FakeInference(tok, SCRIPT)
        if calls is not None:
            calls.append({"path": str(path), "mode": mode, "device": device})
        if made is not None:
            made.append(inf)
        return inf

    return load


@pytest.fixture
def fake_io(monkeypatch):
    """The checkpoint load replaced by the scripted decoding above (the CLI wiring is under test)."""
    monkeypatch.setattr("ltscale.inference.load_for_inference", fake_load_for_inference())
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(key, raising=False)


def _write_pack(root, sizes: dict[str, int]) -> None:
    """A miniature data pack with the registry's layout; question ``qN`` selects the script line."""
    files = {"gsm8k": "gsm8k/test.jsonl", "svamp": "svamp/all.jsonl", "asdiv": "asdiv/all.jsonl"}
    for name, n in sizes.items():
        path = root / files[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            {
                "id": f"{name}-{i}",
                "question": f"q{i % 7}",
                "steps": ["s"] * (1 + i % 3),
                "answer": GOLD[f"q{i % 7}"],
            }
            for i in range(n)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cli_eval_several_benchmarks_writes_suite_and_average(tmp_path, monkeypatch, fake_io, capsys) -> None:
    from ltscale.cli import main

    pack = tmp_path / "pack"
    _write_pack(pack, {"gsm8k": 7, "svamp": 3, "asdiv": 4})
    monkeypatch.setenv("LTSCALE_DATA_DIR", str(pack))
    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    out = tmp_path / "res.json"
    argv = ["eval", "--checkpoint", str(ckpt), "--data", "all", "--output", str(out), "--max-new-tokens", "8"]
    assert main([*argv, "--no-progress"]) == 0
    payload = json.loads(out.read_text())
    assert list(payload["benchmarks"]) == ["gsm8k", "svamp", "asdiv"]
    accs = {k: v["accuracy_official"] for k, v in payload["benchmarks"].items()}
    # q0 and q3 correct under the official rule; q1 (18.0) and q4 (no '#') only numerically
    assert accs == {
        "gsm8k": pytest.approx(3 / 7),
        "svamp": pytest.approx(1 / 3),
        "asdiv": pytest.approx(2 / 4),
    }
    assert payload["average"]["accuracy_official"] == pytest.approx(sum(accs.values()) / 3)  # unweighted
    assert payload["average"]["n"] == 14 and payload["average"]["n_benchmarks"] == 3
    for name, n in (("gsm8k", 7), ("svamp", 3), ("asdiv", 4)):
        lines = (tmp_path / f"res.{name}.examples.jsonl").read_text().splitlines()
        assert [json.loads(x)["id"] for x in lines] == [f"{name}-{i}" for i in range(n)]
        assert payload["benchmarks"][name]["examples"] == f"res.{name}.examples.jsonl"
    text = capsys.readouterr().out
    assert "average over 3 benchmarks" in text


def test_named_benchmark_missing_pack_is_a_user_error(tmp_path, monkeypatch, fake_io, capsys) -> None:
    from ltscale.cli import main

    monkeypatch.setenv("LTSCALE_DATA_DIR", str(tmp_path / "nowhere"))
    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    assert main(["eval", "--checkpoint", str(ckpt), "--data", "svamp"]) == 2
    err = capsys.readouterr().err
    assert "svamp/all.jsonl" in err and "LTSCALE_DATA_DIR" in err


def test_real_benchmarks_load(data_dir, monkeypatch) -> None:
    from ltscale.eval.benchmarks import load_benchmark

    monkeypatch.setenv("LTSCALE_DATA_DIR", str(data_dir))
    sizes = {name: len(load_benchmark(name)) for name in ("gsm8k", "svamp", "asdiv")}
    assert sizes == {"gsm8k": 1319, "svamp": 1000, "asdiv": 2159}
    assert [r.id for r in load_benchmark("gsm8k", limit=2)] == ["gsm8k-test-00000", "gsm8k-test-00001"]


_WORKER = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_fakes", sys.argv[1])
fakes = importlib.util.module_from_spec(spec)
sys.modules["_fakes"] = fakes
spec.loader.exec_module(fakes)
made = []
import ltscale.inference
ltscale.inference.load_for_inference = fakes.fake_load_for_inference(made=made)
from ltscale.cli import main
rc = main(sys.argv[2:])
import os  # main() has left the process group by now
decoded = [len(c["prompts"]) for c in made[0].calls]
print(json.dumps({"rank": int(os.environ["RANK"]), "decoded": decoded}), flush=True)
sys.exit(rc)
"""


def test_cli_eval_two_ranks_scores_every_example_exactly_once(tmp_path, run_ranks) -> None:
    """Real gloo ranks through ``ltscale eval``: 5 problems over 2 ranks, batch 2.

    Rank 0 holds 3 problems, rank 1 holds 2; each decodes exactly its own.
    """
    from pathlib import Path

    data = tmp_path / "d.jsonl"
    rows = [
        {"id": f"r{i}", "question": f"q{i % 7}", "steps": ["s"], "answer": GOLD[f"q{i % 7}"]}
        for i in range(5)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    out = tmp_path / "r.json"
    args = [str(Path(__file__).resolve()), "eval", "--checkpoint", str(ckpt), "--data", str(data)]
    args += ["--output", str(out), "--batch-size", "2", "--max-new-tokens", "8", "--device", "cpu"]
    proc = run_ranks(worker, nproc=2, args=args, timeout=240)
    # both ranks print at once (they leave the process group together): lines may interleave
    reports = [json.loads(x) for x in re.findall(r'\{"rank": \d+, "decoded": \[[\d, ]*\]\}', proc.stdout)]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert {r["rank"]: r["decoded"] for r in reports} == {0: [3], 1: [2]}, "each rank decodes its shard once"
    examples = [json.loads(x) for x in (tmp_path / "r.examples.jsonl").read_text().splitlines()]
    assert [e["index"] for e in examples] == list(range(5)), "each example exactly once, in order"
    assert [e["id"] for e in examples] == [f"r{i}" for i in range(5)]
    summary = json.loads(out.read_text())
    assert summary["n"] == 5 and summary["meta"]["world_size"] == 2
    single, _, _ = run([FakeRecord(r["id"], r["question"], ("s",), r["answer"]) for r in rows])
    assert summary["accuracy_official"] == pytest.approx(single.accuracy_official)
    assert summary["accuracy_numeric"] == pytest.approx(single.accuracy_numeric)


def test_multiarith_hub_rows_are_mapped_without_network(monkeypatch) -> None:
    """``multiarith`` reads ChilleD/MultiArith (question, final_ans); the hub call is faked here."""
    import datasets

    from ltscale.data.records import DataError
    from ltscale.eval.benchmarks import load_benchmark

    calls = []

    def fake_load(name, split=None):
        calls.append((name, split))
        return [{"question": "2 and 3?", "final_ans": "5"}, {"question": "7 - 2?", "final_ans": "5.0"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    recs = load_benchmark("multiarith")
    assert calls == [("ChilleD/MultiArith", "test")]
    assert [(r.id, r.question, r.answer, r.difficulty) for r in recs] == [
        ("multiarith-00000", "2 and 3?", "5", 0),
        ("multiarith-00001", "7 - 2?", "5.0", 0),
    ]
    assert len(load_benchmark("MultiArith", limit=1)) == 1

    def offline(name, split=None):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="needs network access"):
        load_benchmark("multiarith")
