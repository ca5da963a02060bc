"""``ltscale export``: ZeRO-3 shards consolidated offline reproduce the live engine's gathered weights.

One tiny 3-stage run on 2 ranks (ZeRO-3, as ``make run``) per module; the stage-end ``stage{N}/hf``
dirs it writes were gathered from the live engine, so they are the reference the offline
``zero_to_fp32`` path must match: HF logits, latent rollout logits and latent generation.
Exports run in-process through ``ltscale.cli.main`` (exit code + stderr, without paying a
second interpreter start per call).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ltscale.cli import main
from ltscale.model.generation import left_pad

pytestmark = [pytest.mark.e2e, pytest.mark.dist]

SMALL = [
    "model.init.hidden_size=32", "model.init.intermediate_size=64", "model.init.num_hidden_layers=2",
    "model.tokenizer_vocab_size=120", "data.synthetic.n_train=128", "data.synthetic.n_test=16",
    "stages.0.epochs=1", "stages.1.epochs=1", "stages.2.epochs=1", "train.micro_batch_size=8",
    "train.save_every=2", "train.keep_last_n=2", "eval.after_each_stage=false",
]  # fmt: skip
MID_TAG = "step-000006"  # 8 steps per stage; keep_last_n=2 keeps this one next to `final`


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, repo_root, run_ranks) -> Path:
    """Train once per module, with the product's launch line (``deepspeed ltscale/train.py``)."""
    run = tmp_path_factory.mktemp("export") / "run"
    train = repo_root / "ltscale" / "train.py"
    run_ranks(train, nproc=2, args=[*SMALL, f"run_dir={run}"], timeout=600, launcher="deepspeed")
    assert (run / "stage3" / "COMPLETE").is_file() and (run / "stage3" / "ckpt" / MID_TAG).is_dir()
    return run


def export(*args: str | Path) -> int:
    return main(["export", *map(str, args)])


def _batch(vocab: int, thinking_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids with <thinking> slots at ragged positions (exercises rollout + fusion)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, thinking_id, (3, 20), generator=g)
    ids[0, [5, 6, 12]] = thinking_id
    ids[1, [9]] = thinking_id
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    return ids, mask


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_export_matches_live_gathered_weights(run_dir, tmp_path, stage):
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"hf{stage}"
    args = ["--checkpoint", run_dir, "--output", out] + (["--stage", str(stage)] if stage != 3 else [])
    assert export(*args) == 0  # stage 3 = the run dir's highest finished stage, tag `latest` (= final)
    ref_dir = run_dir / f"stage{stage}" / "hf"
    got, ref = _weights(out), _weights(ref_dir)
    assert got.keys() == ref.keys()  # tied lm_head: dropped by save_pretrained in both
    meta = json.loads((out / "ltscale_latent.json").read_text())
    ref_meta = json.loads((ref_dir / "ltscale_latent.json").read_text())
    assert {k: meta[k] for k in ref_meta} == ref_meta
    assert meta["source"]["tag"] == "final" and meta["source"]["stage"] == stage
    a = AutoModelForCausalLM.from_pretrained(out).eval()
    b = AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    ids, mask = _batch(a.config.vocab_size, meta["thinking_token_id"])
    with torch.no_grad():
        la, lb = a(input_ids=ids, attention_mask=mask).logits, b(input_ids=ids, attention_mask=mask).logits
    assert (la - lb).abs().max().item() <= 1e-6  # in practice bit-identical (fp32 master == fp32 module)


def _force_latents(lm, steps: set[int]) -> None:
    """Make greedy decoding pick ``<thinking>`` at the given decode steps.

    The tiny model (8 steps per stage) never chooses ``<thinking>`` by itself, which would leave
    the latent path untested. Only the *choice* is forced: the latent input is still the fusion
    of the model's own hidden state and logits (``<thinking>`` is masked out of the fusion).
    """
    orig, calls = lm.lm_head, {"n": 0}

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = orig(hidden)
        if hidden.dim() == 2:  # decode steps (the rollout passes 3-D hidden states)
            if calls["n"] in steps:
                logits = logits.clone()
                logits[:, lm.thinking_token_id] = 1e4
            calls["n"] += 1
        return logits

    lm.lm_head = head


def test_exported_model_generates_with_latents_like_the_stage_export(run_dir, tmp_path):
    from ltscale.data.formatting import prompt_ids
    from ltscale.data.synthetic import synthetic_splits
    from ltscale.model.io import load_latent_model

    out = tmp_path / "hf"
    assert export("--checkpoint", run_dir / "stage3", "--output", out) == 0
    (lm, tok), (ref, _) = load_latent_model(out), load_latent_model(run_dir / "stage3" / "hf")
    assert lm.mode == ref.mode == "fusion" and lm.thinking_token_id == ref.thinking_token_id
    ids, mask = _batch(lm.base.config.vocab_size, lm.thinking_token_id)
    with torch.no_grad():  # the training rollout: fusion latents at the <thinking> slots
        assert torch.equal(lm(ids, mask).logits, ref(ids, mask).logits)
    _, test = synthetic_splits(4, 4, 3)
    prompts = [list(prompt_ids(tok, r.question, use_chat_template=None)) for r in test]
    x, m = left_pad(prompts, tok.pad_token_id)  # as the decode loop prefills prompts
    results = []
    for model in (lm, ref):
        _force_latents(model, steps={0, 1, 4})
        results.append(model.generate(x, m, 12, eos_token_id=tok.eos_token_id))
    got, want = results
    assert int(want.num_latent.min()) >= 1, "the latent path was not exercised"
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.num_latent, want.num_latent)


def test_mid_stage_tag_and_export_without_hf_dirs(run_dir, tmp_path):
    out = tmp_path / "mid"
    assert export("--checkpoint", run_dir / "stage3" / "ckpt", "--tag", MID_TAG, "--output", out) == 0
    meta = json.loads((out / "ltscale_latent.json").read_text())
    assert meta["mode"] == "fusion"
    assert meta["source"] | {"checkpoint": None} == {
        "checkpoint": None,
        "tag": MID_TAG,
        "stage": 3,
        "step_in_stage": 6,
        "global_step": 22,
        "stage_complete": False,
        "dtype": "float32",
        "via": "zero_to_fp32",
    }
    mid, final = _weights(out), _weights(run_dir / "stage3" / "hf")
    assert mid.keys() == final.keys() and any(not torch.equal(mid[k], final[k]) for k in mid)
    # A run dir stripped of every hf export (e.g. preempted in stage 1's export): the model config is
    # rebuilt from config.resolved.yaml, the tokenizer from RUN_DIR/tokenizer + <thinking>.
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("hf"))
    out2 = tmp_path / "rebuilt"
    assert export("--checkpoint", bare / "stage3" / "ckpt" / "final", "--output", out2) == 0
    ref = run_dir / "stage3" / "hf"
    assert json.loads((out2 / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    assert (out2 / "tokenizer.json").read_bytes() == (ref / "tokenizer.json").read_bytes()
    got = _weights(out2)
    assert got.keys() == final.keys() and all(torch.equal(got[k], final[k]) for k in got)
    # bf16 on request: the stored weights are the rounded fp32 masters.
    out3 = tmp_path / "bf16"
    assert export("--checkpoint", run_dir, "--output", out3, "--dtype", "bf16") == 0
    half = _weights(out3)
    assert all(
        half[k].dtype == torch.bfloat16 and torch.equal(half[k], final[k].to(torch.bfloat16)) for k in half
    )


def _fake_run(root: Path) -> Path:
    """A run-dir skeleton with a foreign tag dir and one whose shards are missing."""
    ckpt = root / "run" / "stage1" / "ckpt"
    (ckpt / "foreign").mkdir(parents=True)
    (root / "run" / "config.resolved.yaml").write_text(
        "model: {init: {hidden_size: 8}}\nstages: [{mode: cot}]\n"
    )
    (ckpt / "foreign" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (ckpt / "noshards").mkdir()
    (ckpt / "noshards" / "ltscale_meta.json").write_text('{"zero_stage": 3}')
    (root / "run" / "stage2" / "ckpt").mkdir(parents=True)
    (root / "notarun").mkdir()
    (root / "someone_elses").mkdir()
    (root / "someone_elses" / "keep.txt").write_text("precious")
    return root / "run"


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "not_a_run",
        "no_finished_stage",
        "tag_missing",
        "foreign",
        "no_shards",
        "empty_ckpt_root",
        "tmp_tag",
        "output_not_export",
    ],
)
def test_bad_paths_exit_2_naming_the_path(tmp_path, capsys, case):
    run = _fake_run(tmp_path)
    ckpt, out = run / "stage1" / "ckpt", tmp_path / "out"
    argv, named = {
        "missing": (["--checkpoint", tmp_path / "nope"], tmp_path / "nope"),
        "not_a_run": (["--checkpoint", tmp_path / "notarun"], tmp_path / "notarun"),
        "no_finished_stage": (["--checkpoint", run], run),
        "tag_missing": (["--checkpoint", run, "--stage", "1", "--tag", "final"], ckpt / "final"),
        "foreign": (["--checkpoint", run / "stage1", "--tag", "foreign"], ckpt / "foreign"),
        "no_shards": (["--checkpoint", run / "stage1", "--tag", "noshards"], ckpt / "noshards"),
        "empty_ckpt_root": (["--checkpoint", run / "stage2"], run / "stage2" / "ckpt"),
        "tmp_tag": (["--checkpoint", ckpt, "--tag", ".tmp-final"], ckpt / ".tmp-final"),
        "output_not_export": (
            ["--checkpoint", ckpt, "--tag", "noshards", "--output", tmp_path / "someone_elses"],
            tmp_path / "someone_elses",
        ),
    }[case]
    if "--output" not in argv:
        argv += ["--output", out]
    assert export(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ltscale: error: ") and str(named) in err, err
    assert len(err.strip().splitlines()) == 1, "one line, no traceback"
    assert not out.exists() and (tmp_path / "someone_elses" / "keep.txt").read_text() == "precious"
