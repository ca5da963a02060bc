"""The ``ltscale`` console script: checkpoint resolution, user errors, data synth/check, eval, generate.

eval/generate run against a fake ``ltscale.inference.load_for_inference`` (the scripted decoding +
tiny tokenizer from test_evaluate.py), so they test the CLI wiring, not the model.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ltscale.cli import main


def _fakes():
    """test_evaluate.py's fakes, loaded by path so this works under any pytest import mode."""
    name = "_ltscale_eval_fakes"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("test_evaluate.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while the file executes
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _hf(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_missing_checkpoint_exit_2(tmp_path, capsys) -> None:
    missing = tmp_path / "no_such_run"
    rc = main(["eval", "--checkpoint", str(missing), "--data", str(tmp_path / "d.jsonl")])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(missing) in err and err.startswith("ltscale: error:")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_data_exit_2(tmp_path, capsys) -> None:
    hf = _hf(tmp_path / "hf")
    rc = main(["eval", "--checkpoint", str(hf), "--data", str(tmp_path / "nope.jsonl")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope.jsonl" in err and "Traceback" not in err


def test_generate_missing_checkpoint_exit_2(tmp_path, capsys) -> None:
    assert main(["generate", "--checkpoint", str(tmp_path / "x"), "what is 2+2?"]) == 2
    assert str(tmp_path / "x") in capsys.readouterr().err


def test_argparse_errors_return_2(capsys) -> None:
    assert main(["eval"]) == 2
    assert main([]) == 2
    assert main(["eval", "--checkpoint", "x", "--data", "y", "--batch-size", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "eval" in capsys.readouterr().out


def test_data_synth_and_check(tmp_path, capsys) -> None:
    out = tmp_path / "syn" / "train.jsonl"
    assert main(["data", "synth", "--n", "12", "--seed", "3", "--out", str(out)]) == 0
    assert "12 records" in capsys.readouterr().out
    lines = out.read_text().splitlines()
    assert len(lines) == 12 and {"id", "question", "steps", "answer"} <= set(json.loads(lines[0]))
    first = out.read_text()
    assert main(["data", "synth", "--n", "12", "--seed", "3", "--out", str(out)]) == 0
    assert out.read_text() == first  # seeded: deterministic
    assert main(["data", "check", str(out)]) == 0
    assert "12 records OK" in capsys.readouterr().out


def test_data_check_invalid_and_missing(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "question": "q", "steps": [], "answer": "1"}) + "\n{not json\n")
    assert main(["data", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "Traceback" not in err
    assert main(["data", "check", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


@pytest.fixture
def fake_model_io(monkeypatch):
    """Replace the checkpoint load with the scripted decoding; returns the list of load calls
    (path, mode, device)."""
    calls: list[dict] = []
    monkeypatch.setattr("ltscale.inference.load_for_inference", _fakes().fake_load_for_inference(calls))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return calls


def test_eval_end_to_end(tmp_path, capsys, fake_model_io) -> None:
    run = tmp_path / "run"
    _hf(run / "stage3" / "hf")
    data = tmp_path / "test.jsonl"
    rows = [
        {"id": "a", "question": "q0", "steps": ["x"], "answer": "18"},
        {"id": "b", "question": "q1", "steps": ["x", "y"], "answer": "18"},
        {"id": "c", "question": "q2", "steps": ["x"], "answer": "18"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "out" / "results.json"
    argv = ["eval", "--checkpoint", str(run), "--data", str(data), "--output", str(output)]
    rc = main([*argv, "--batch-size", "2", "--max-new-tokens", "8", "--mode", "fusion", "--device", "cpu"])
    assert rc == 0
    assert fake_model_io == [{"path": str(run / "stage3" / "hf"), "mode": "fusion", "device": "cpu"}]
    summary = json.loads(output.read_text())
    assert summary["n"] == 3
    assert summary["accuracy_official"] == pytest.approx(1 / 3)
    assert summary["accuracy_numeric"] == pytest.approx(2 / 3)
    assert summary["meta"]["checkpoint"] == str(run / "stage3" / "hf")
    examples = [json.loads(x) for x in (tmp_path / "out" / "results.examples.jsonl").read_text().splitlines()]
    assert [e["id"] for e in examples] == ["a", "b", "c"]
    out = capsys.readouterr().out
    assert "| stage3" in out and "33.33" in out and "results.examples.jsonl" in out


def test_eval_limit(tmp_path, fake_model_io) -> None:
    hf = _hf(tmp_path / "hf")
    data = tmp_path / "test.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"q{i}", "steps": [], "answer": "18"}) + "\n" for i in range(4))
    )
    output = tmp_path / "r.json"
    argv = ["eval", "--checkpoint", str(hf), "--data", str(data), "--output", str(output), "--limit", "2"]
    assert main([*argv, "--max-new-tokens", "8", "--no-progress"]) == 0
    assert json.loads(output.read_text())["n"] == 2


def test_generate_shows_latent_steps(tmp_path, capsys, fake_model_io) -> None:
    hf = _hf(tmp_path / "hf")
    assert main(["generate", "--checkpoint", str(hf), "q1", "--max-new-tokens", "16", "--marker", "[L]"]) == 0
    out = capsys.readouterr().out
    assert "Step [L] [L] #### 18.0" in out
    assert "answer: 18.0" in out and "latent steps: 2" in out and "cut at" not in out
    assert main(["generate", "--checkpoint", str(hf), "q5", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "answer: Step Step Step" in out and "cut at --max-new-tokens" in out


# -------------------------------------------------- generate == eval, every method's checkpoint


BOT, EOT = "<|start-latent|>", "<|end-latent|>"


def _method_checkpoint(root: Path, method: str) -> Path:
    """A tiny real checkpoint as the trainer's stage export writes it, with ``method``'s meta."""
    import torch

    from ltscale.methods.coconut import Coconut
    from ltscale.methods.softcot import SoftCoTLM
    from ltscale.model import LatentLM
    from ltscale.model.io import save_latent_model
    from ltscale.run_config import load_config
    from tests.helpers import make_tiny_llama

    fakes = _fakes()
    tok = fakes.make_tokenizer([*fakes.WORDS, BOT, EOT])
    think, vocab = tok.convert_tokens_to_ids("<thinking>"), len(tok)
    base = make_tiny_llama(vocab, kv_heads=2, max_positions=128, dtype=torch.float32, seed=3)
    with torch.no_grad():  # <thinking> often the argmax: latent steps happen
        base.lm_head.weight[think] += 0.5 * base.lm_head.weight.abs().mean(dim=0).sign()
    mode = {"cot": "cot", "pause": "pause", "no_stage3": "hidden", "coconut": "hidden", "softcot": "cot"}
    lm = LatentLM(base, think, mode=mode.get(method, "fusion"), adapter=method == "adapter", adapter_hidden=8)
    extra: dict = {}
    if method == "coconut":
        ids = {BOT: tok.convert_tokens_to_ids(BOT), EOT: tok.convert_tokens_to_ids(EOT)}
        extra = Coconut().checkpoint_meta(load_config(None, ["method=coconut"]), 2, ids)
    elif method == "soft_thinking":
        extra = {
            "method": method,
            "soft_thinking": {"cold_stop_steps": 3, "entropy_threshold": 5.0, "top_k": 4},
        }
    elif method == "softcot":
        assistant = make_tiny_llama(
            vocab, hidden=24, kv_heads=2, max_positions=128, dtype=torch.float32, seed=4
        )
        assistant.save_pretrained(root / "assistant")
        lm = SoftCoTLM(base, think, assistant=assistant, placeholder_id=tok.eos_token_id, n_thoughts=2)
        extra = {"method": method, "softcot": {"assistant_dir": str(root / "assistant"), "n_thoughts": 2}}
    return save_latent_model(
        root / "hf", config=base.config, latent_state=lm.state_dict(), tokenizer=tok,
        latent_config={**lm.latent_config(), **extra},
    )  # fmt: skip


@pytest.mark.parametrize(
    "method, option",
    [
        (m, None)
        for m in ("lt_tuning", "cot", "pause", "no_stage3", "adapter", "coconut", "soft_thinking", "softcot")
    ]
    + [("cot", "soft_thinking")],  # --method: Soft-Thinking decodes any checkpoint
)
def test_generate_shows_what_eval_scores_for_every_method(tmp_path, capsys, method, option) -> None:
    """``ltscale generate`` and ``ltscale eval`` load and decode a checkpoint the same way: the same
    text and latent steps per question, for every method's checkpoint (forced Coconut latents,
    SoftCoT thoughts, Soft-Thinking concept tokens included) and under ``--method``."""
    hf = _method_checkpoint(tmp_path, method)
    questions = ["q0 words", "q3", "q5 long question words"]
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "steps": ["s"], "answer": "1"}) + "\n" for q in questions)
    )
    flags = ["--max-new-tokens", "8", "--device", "cpu"] + (["--method", option] if option else [])
    if option == "soft_thinking":
        flags += [
            "--method-option",
            "soft_thinking.cold_stop_steps=2",
            "--method-option",
            "soft_thinking.top_k=3",
        ]
    out = tmp_path / "r.json"
    argv = ["eval", "--checkpoint", str(hf), "--data", str(data), "--output", str(out), "--batch-size", "2"]
    assert main([*argv, "--no-progress", *flags]) == 0
    examples = [json.loads(x) for x in (tmp_path / "r.examples.jsonl").read_text().splitlines()]
    capsys.readouterr()
    for q, ex in zip(questions, examples, strict=True):
        assert main(["generate", "--checkpoint", str(hf), q, "--marker", "<thinking>", *flags]) == 0
        text, _, tail = capsys.readouterr().out.rpartition("\n\nanswer: ")
        assert text == ex["generated_text"], q
        assert f"latent steps: {ex['num_latent']}  generated tokens: {ex['num_generated']}" in tail
    assert sum(e["num_latent"] for e in examples) > 0, "test is vacuous: no latent step was taken"


def test_not_an_ltscale_checkpoint_and_bad_method_options_exit_2(tmp_path, capsys) -> None:
    hf = _hf(tmp_path / "plain_hf")  # an HF dir without ltscale_latent.json
    assert main(["generate", "--checkpoint", str(hf), "q1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "not an ltscale checkpoint" in err and "Traceback" not in err
    argv = ["generate", "--checkpoint", str(hf), "q1", "--method-option", "soft_thinking.top_k"]
    assert main(argv) == 2
    assert "expected SECTION.KEY=VALUE" in capsys.readouterr().err
