"""The paper's analyses as numbers: collapse metrics, Spearman / difficulty, instrumented decoding."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

from ltscale.eval.analysis import (
    collapse_metrics,
    difficulty_analysis,
    entropy_attention_curves,
    run_analysis,
    spearman,
    trace_generation,
)

# ----------------------------------------------------------------------------------- collapse


def test_identical_vectors_are_fully_collapsed() -> None:
    v = torch.randn(16, generator=torch.Generator().manual_seed(0))
    m = collapse_metrics(v.repeat(20, 1))
    assert m["mean_cos"] == pytest.approx(1.0, abs=1e-9)
    assert m["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert m["pc1_explained"] == 1.0
    assert m["n"] == 20


def test_scaled_copies_are_collapsed_too() -> None:
    v = torch.randn(8, generator=torch.Generator().manual_seed(1))
    m = collapse_metrics(torch.stack([v * s for s in (0.5, 1.0, 2.0, 3.0)]))
    assert m["mean_cos"] == pytest.approx(1.0, abs=1e-9)
    assert m["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert m["pc1_explained"] == pytest.approx(1.0, abs=1e-9)  # varies along one direction only


def test_isotropic_random_vectors_are_not_collapsed() -> None:
    d = 16
    x = torch.randn(2000, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    m = collapse_metrics(x)
    assert abs(m["mean_cos"]) < 0.02
    assert m["effective_rank"] > 0.9 * d
    assert m["pc1_explained"] < 1.5 / d


def test_collapse_edge_cases() -> None:
    assert collapse_metrics(torch.ones(1, 4)) is None
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        collapse_metrics(torch.ones(4))
    m = collapse_metrics(torch.zeros(3, 4))  # zero vectors: cosine 0, rank 0, no variation
    assert m["mean_cos"] == 0.0 and m["effective_rank"] == 0.0 and m["pc1_explained"] == 1.0


# ----------------------------------------------------------------------------- spearman / difficulty


def test_spearman_known_values() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)  # ranks, not values
    # ties: ranks x = 1, 2.5, 2.5, 4 and y = 1, 3, 2, 4 -> 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # constant side: undefined
    assert spearman([1], [2]) is None
    with pytest.raises(ValueError):
        spearman([1, 2], [1])


def _stub_examples() -> list[dict]:
    """A stub eval output: difficulty d (1..4) with known latent counts."""
    counts = {1: [0, 1, 1], 2: [1, 2], 3: [2, 2, 4], 4: [5]}
    return [
        {"index": i, "difficulty": d, "num_latent": c, "correct": False}
        for i, (d, c) in enumerate((d, c) for d, cs in counts.items() for c in cs)
    ]


def test_difficulty_analysis_on_stub_output(tmp_path) -> None:
    path = tmp_path / "eval.examples.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in _stub_examples()))
    examples = [json.loads(x) for x in path.read_text().splitlines()]
    res = difficulty_analysis(examples)
    # hand-computed average ranks of x = 1,1,1,2,2,3,3,3,4 and y = 0,1,1,1,2,2,2,4,5
    rx = [2, 2, 2, 4.5, 4.5, 7, 7, 7, 9]
    ry = [1, 3, 3, 3, 6, 6, 6, 8, 9]
    mx, my = sum(rx) / 9, sum(ry) / 9
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    expected = cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert res["spearman"] == pytest.approx(expected)
    assert 0.8 < res["spearman"] < 0.95
    assert res["n"] == 9
    assert res["by_difficulty"] == {
        1: {"n": 3, "mean_latent": pytest.approx(2 / 3)},
        2: {"n": 2, "mean_latent": 1.5},
        3: {"n": 3, "mean_latent": pytest.approx(8 / 3)},
        4: {"n": 1, "mean_latent": 5.0},
    }


# --------------------------------------------------------------------------- instrumented decoding


@dataclass(frozen=True)
class Rec:
    question: str
    steps: tuple = ("a", "b")

    @property
    def difficulty(self) -> int:
        return len(self.steps)


THINK = 63


def _latent_lm(tiny_llama, mode: str = "fusion"):
    """A tiny fp64 LatentLM whose <thinking> row is a scaled copy of token 7's row.

    With this seed, prompt [5, 9, 11] then emits 7 -> <thinking> x4 -> text again: a mix of latent
    and text steps (found by inspection; other prompts loop on one text token).
    """
    from ltscale.model import LatentLM

    base = tiny_llama(vocab_size=64, hidden=32, layers=2, heads=4, seed=3).eval()
    with torch.no_grad():
        w = base.get_output_embeddings().weight
        w[THINK] = 1.02 * w[7]
    return LatentLM(base, THINK, mode=mode).eval()


def test_trace_matches_batched_generation(tiny_llama) -> None:
    lm = _latent_lm(tiny_llama)
    saw_latent = False
    for prompt in ([1, 2, 3, 4], [5, 9, 11], [7, 8, 9, 10, 12, 13]):
        ref = lm.generate(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), 12)
        t = trace_generation(lm, prompt, 12, attention=True)
        assert t.tokens == ref.sequences[0, : int(ref.lengths[0])].tolist()
        assert t.num_latent == int(ref.num_latent[0]) == len(t.latent_inputs)
        saw_latent |= t.num_latent > 0
        assert len(t.entropy) == len(t.attn_to_latent) == len(t.tokens)
        assert all(0 <= e <= math.log(64) + 1e-9 for e in t.entropy)
        assert all(-1e-9 <= a <= 1 + 1e-9 for a in t.attn_to_latent)
        first = t.is_latent.index(True) if True in t.is_latent else len(t.tokens)
        assert all(a == 0 for a in t.attn_to_latent[: first + 1]), "no latent key before the first latent"
        if first + 1 < len(t.tokens):
            assert t.attn_to_latent[first + 1] > 0
    assert saw_latent, "the fixture should make the model emit latents"
    assert lm.base.config._attn_implementation == "sdpa", "attention implementation restored"


def test_forced_probe_and_mode_check(tiny_llama) -> None:
    lm = _latent_lm(tiny_llama)
    t = trace_generation(lm, [1, 2, 3], 4, attention=False, force_latent_steps=4)
    assert t.is_latent == [True] * 4 and len(t.latent_inputs) == 3  # the 4th would be fed after the end
    assert t.attn_to_latent == []
    cot = _latent_lm(tiny_llama, mode="cot")
    with pytest.raises(ValueError, match="hidden/fusion"):
        trace_generation(cot, [1, 2], 3, force_latent_steps=2)


def test_run_analysis_numbers_scalars_and_figures(tiny_llama, tmp_path) -> None:
    from ltscale.eval.plots import save_figures

    lm = _latent_lm(tiny_llama)

    class Tok:
        eos_token_id = None

    recs = [Rec(question=str(i), steps=("s",) * (1 + i % 3)) for i in range(6)]
    import ltscale.data.formatting as fmt

    orig = fmt.prompt_ids
    fmt.prompt_ids = lambda tok, q, use_chat_template=None: [1 + int(q), 2, 3 + int(q)]
    try:
        res = run_analysis(lm, Tok(), recs, max_new_tokens=10, probe_steps=4)
    finally:
        fmt.prompt_ids = orig
    assert res.numbers["n_traced"] == 6
    assert sorted(res.probe_steps) == [1, 2, 3, 4]  # probe_steps=4: four fed latent embeddings
    assert all(v.shape == (6, 32) for v in res.probe_steps.values())
    sc = res.scalars()
    for k in (1, 2, 3, 4):
        assert -1 <= sc[f"latent/probe_collapse_cos_step{k}"] <= 1
        assert sc[f"latent/probe_effective_rank_step{k}"] >= 1
        assert 0 < sc[f"latent/probe_pc1_var_step{k}"] <= 1
    assert "latent/entropy_mean" in sc and "latent/attn_to_latent_mean" in sc
    assert all(math.isfinite(v) for v in sc.values())
    curves = entropy_attention_curves([])
    assert curves == {"entropy": [], "attn_to_latent": [], "alive": []}
    assert lm.training is False
    paths = save_figures(res.figures(), tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["difficulty.png", "entropy_attention.png", "pca.png", "pca_probe.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    json.dumps(res.numbers)  # JSON-ready


def test_ltscale_analyze_cli(tiny_llama, tmp_path, monkeypatch, capsys) -> None:
    """``ltscale analyze`` on a tiny real LatentLM; difficulty from a stub eval examples file."""
    import importlib.util
    import sys
    from pathlib import Path

    from ltscale.cli import main
    from ltscale.model import LatentLM

    spec = importlib.util.spec_from_file_location("_fakes_a", Path(__file__).with_name("test_evaluate.py"))
    fakes = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "_fakes_a", fakes)
    spec.loader.exec_module(fakes)
    tok = fakes.make_tokenizer()
    think = tok.convert_tokens_to_ids("<thinking>")
    base = tiny_llama(vocab_size=len(tok), hidden=32, layers=2, heads=4, seed=1, dtype=torch.float32).eval()
    monkeypatch.setattr(
        "ltscale.model.io.load_latent_model",
        lambda path, *, mode=None, device="cpu", dtype=None: (
            LatentLM(base, think, mode=mode or "fusion"),
            tok,
        ),
    )
    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"q{i} words", "steps": ["s"], "answer": "1"}) + "\n" for i in range(5)
        )
    )
    stub = tmp_path / "eval.examples.jsonl"
    stub.write_text("".join(json.dumps(e) + "\n" for e in _stub_examples()))
    out = tmp_path / "an"
    argv = [
        "analyze",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--limit",
        "4",
    ]
    argv += [
        "--max-new-tokens",
        "6",
        "--probe-steps",
        "3",
        "--examples",
        str(stub),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(argv) == 0
    payload = json.loads((out / "analysis.json").read_text())
    assert payload["n_traced"] == 4
    assert payload["difficulty"]["spearman"] == pytest.approx(
        difficulty_analysis(_stub_examples())["spearman"]
    )
    assert payload["scalars"]["latent/difficulty_spearman"] == pytest.approx(
        payload["difficulty"]["spearman"]
    )
    assert set(payload["probe_collapse"]) == {"1", "2", "3"}
    assert {p.name for p in out.glob("*.png")} >= {
        "difficulty.png",
        "pca.png",
        "pca_probe.png",
        "entropy_attention.png",
    }
    assert "probe_collapse step 1" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"difficulty": 1}\n')
    assert main([*argv, "--examples", str(bad)]) == 2  # the last --examples wins
    assert "needs 'difficulty' and 'num_latent'" in capsys.readouterr().err
