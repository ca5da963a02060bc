"""``ltscale lm-eval`` against ``ltscale eval`` on real checkpoints: the same answers, latent steps and
accuracy, through lm-eval's own task loading, filters, metrics and (for the stage-1 export) its HF
model.

The checkpoints are built once per module in seconds, with the trainer's tokenizer and model
builders: a tiny model memorises 8 synthetic problems in explicit (CoT) mode, so accuracy is
neither 0 nor 1, and is saved three ways: a stage-1 export (explicit decoding), a stage-3 export
(fusion mode) whose ``<thinking>`` logit is raised so that some answers think and some do not, and
a Coconut checkpoint (forced latents after ``<bot>``, fixed batches instead of continuous
batching). What these cannot show: that a trained curriculum's numbers match (the README table does
that on ``make run``'s checkpoints), and anything GPU-specific (CPU here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import require_lm_eval

pytestmark = [pytest.mark.e2e]

SMALL = [
    "model.init.hidden_size=32", "model.init.intermediate_size=64", "model.init.num_hidden_layers=2",
    "model.init.tie_word_embeddings=false", "model.tokenizer_vocab_size=120",
    "data.synthetic.n_train=64", "data.synthetic.n_test=8", "method=coconut",
]  # fmt: skip
MAX_NEW = 40
TASK = "ltscale_e2e"


def _memorise(lm, tokenizer, records, steps: int = 120) -> None:
    from ltscale.data import encode_records

    ex = encode_records(tokenizer, records, max_length=256)
    width = max(len(e) for e in ex)
    ids = torch.full((len(ex), width), tokenizer.pad_token_id)
    labels = torch.full((len(ex), width), -100)
    mask = torch.zeros((len(ex), width), dtype=torch.long)
    for i, e in enumerate(ex):
        ids[i, : len(e)], labels[i, : len(e)], mask[i, : len(e)] = (torch.tensor(e.input_ids),
                                                                    torch.tensor(e.labels), 1)  # fmt: skip
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    lm.train()
    for _ in range(steps):
        loss = lm(ids, mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_lm_eval()
    from ltscale.methods.coconut import BOT, EOT
    from ltscale.model.io import save_latent_model
    from ltscale.run_config import load_config
    from ltscale.run_setup import build_latent_model, prepare_data

    root = tmp_path_factory.mktemp("lm_eval_e2e")
    cfg = load_config(None, [*SMALL, f"run_dir={root}"])
    data = prepare_data(cfg, root)
    lm = build_latent_model(cfg, data)
    torch.manual_seed(0)
    _memorise(lm, data.tokenizer, data.eval_records)

    def save(name: str, **meta) -> Path:
        out = root / name / "hf"
        save_latent_model(
            out,
            config=lm.base.config,
            latent_state=lm.state_dict(),
            tokenizer=data.tokenizer,
            latent_config={**lm.latent_config(), **meta},
        )
        return out

    ckpts = {"stage1": save("stage1")}
    coconut = {"stage": 1, "n_latent": 2, "bot_id": data.special_ids[BOT], "eot_id": data.special_ids[EOT]}
    ckpts["coconut"] = save("coconut", mode="hidden", method="coconut", coconut=coconut)
    with torch.no_grad():  # think instead of ending a step's line: more steps, more latent steps
        head = lm.base.lm_head.weight
        head[data.thinking_id] = head[data.tokenizer.convert_tokens_to_ids("\n")] * 1.05
    ckpts["stage3"] = save("stage3", mode="fusion")

    test = root / "test.jsonl"
    test.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in data.eval_records))
    from ltscale.lmeval.tasks import write_tasks

    write_tasks(root / "tasks", [], files={"e2e": str(test)})
    return {"root": root, "ckpts": ckpts, "test": test, "tasks": root / "tasks"}


@pytest.fixture(autouse=True)
def _env(setup, monkeypatch):
    monkeypatch.setenv("LTSCALE_LMEVAL_TASKS", str(setup["root"] / "default_tasks"))
    monkeypatch.setenv("LTSCALE_DATA_DIR", str(setup["root"] / "no_pack"))  # only the tiny set is written
    monkeypatch.setenv("HF_DATASETS_CACHE", str(setup["root"] / "hf_datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def ltscale_eval(setup, name: str, tmp_path) -> list[dict]:
    from ltscale.cli import main

    out = tmp_path / f"{name}.json"
    argv = ["eval", "--checkpoint", str(setup["ckpts"][name]), "--data", str(setup["test"]), "--output", str(out),
            "--max-new-tokens", str(MAX_NEW), "--batch-size", "3", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return [json.loads(x) for x in out.with_name(f"{name}.examples.jsonl").read_text().splitlines()]


def simple_evaluate(setup, model) -> dict:
    from lm_eval import simple_evaluate as run
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(setup["tasks"]), include_defaults=False)
    kw = {"model_args": model[1]} if isinstance(model, tuple) else {}
    res = run(
        model=model[0] if isinstance(model, tuple) else model,
        tasks=[TASK],
        task_manager=tm,
        log_samples=True,
        gen_kwargs={"max_gen_toks": MAX_NEW},
        batch_size=3,
        device="cpu",
        **kw,
    )
    return res


def by_id(samples: list[dict]) -> dict[str, dict]:
    return {s["doc"]["id"]: s for s in samples}


def test_stage1_export_hf_ltscale_and_ltscale_eval_agree(setup, tmp_path, capsys) -> None:
    """(a) the same generations and the same accuracy from all three."""
    from ltscale.cli import main

    want = ltscale_eval(setup, "stage1", tmp_path)
    acc = sum(e["correct"] for e in want) / len(want)
    assert 0 < acc < 1, "the memorised model should get some problems right and some wrong"

    out = tmp_path / "lm"
    argv = ["lm-eval", "--model", "ltscale", "--model_args", f"checkpoint={setup['ckpts']['stage1']},batch_size=3",
            "--tasks", TASK, "--include_path", str(setup["tasks"]), "--gen_kwargs", f"max_gen_toks={MAX_NEW}",
            "--device", "cpu", "--output_path", str(out), "--log_samples"]  # fmt: skip
    assert main(argv) == 0
    (samples_file,) = out.glob(f"*/samples_{TASK}_*.jsonl")
    (results_file,) = out.glob("*/results_*.json")
    ours = by_id([json.loads(x) for x in samples_file.read_text().splitlines()])
    result = json.loads(results_file.read_text())["results"][TASK]
    hf = simple_evaluate(setup, ("hf", {"pretrained": str(setup["ckpts"]["stage1"]), "dtype": "float32"}))
    theirs = by_id(hf["samples"][TASK])
    for e in want:
        assert ours[e["id"]]["resps"][0][0] == e["generated_text"]
        assert theirs[e["id"]]["resps"][0][0] == e["generated_text"]
        assert ours[e["id"]]["filtered_resps"][0] == e["prediction"]
    assert result["official,extract"] == pytest.approx(acc)
    assert result["numeric,extract"] == pytest.approx(sum(e["correct_numeric"] for e in want) / len(want))
    assert hf["results"][TASK]["official,extract"] == pytest.approx(acc)
    (log,) = out.glob("ltscale_latents_*.jsonl")
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    # doc order = record order
    assert [r["num_generated"] for r in rows] == [e["num_generated"] for e in want]


@pytest.mark.parametrize("name", ["stage3", "coconut"])
def test_latent_checkpoints_give_ltscale_evals_answers_and_latent_steps(setup, tmp_path, name) -> None:
    """(b) per problem: the same prediction, generated text and number of latent steps."""
    from ltscale.lmeval.backend import LTScaleLM

    want = ltscale_eval(setup, name, tmp_path)
    lm = LTScaleLM(checkpoint=str(setup["ckpts"][name]), batch_size=3, device="cpu")
    res = simple_evaluate(setup, lm)
    got = by_id(res["samples"][TASK])
    latents = {r["doc_id"]: r for r in lm.samples}
    for e in want:
        s = got[e["id"]]
        assert s["filtered_resps"][0] == e["prediction"] and s["resps"][0][0] == e["generated_text"]
        assert latents[s["doc_id"]]["num_latent"] == e["num_latent"]
        assert latents[s["doc_id"]]["num_generated"] == e["num_generated"]
    counts = [e["num_latent"] for e in want]
    assert sum(counts) > 0, f"{name}: no latent steps, the comparison would be vacuous"
    if name == "stage3":
        assert min(counts) < max(counts) and "<thinking>" in "".join(e["generated_text"] for e in want)


def test_bad_model_args_key_is_one_line(setup, capsys) -> None:
    """(d) before lm-eval indexes its tasks, naming the key and the valid ones; exit code 2."""
    from ltscale.cli import main

    argv = [
        "lm-eval",
        "--model_args",
        f"checkpoint={setup['ckpts']['stage1']},max_new_tokens=8",
        "--tasks",
        TASK,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "ltscale lm-eval: error: --model_args: unknown key 'max_new_tokens'"
    )
    assert "valid: checkpoint, method" in err[0]


@pytest.mark.dist
def test_two_ranks_shard_and_gather_like_ltscale_eval(setup, tmp_path, run_ranks) -> None:
    """Under torchrun each rank decodes lm-eval's shard of the task; rank 0 gathers and writes every
    answer and latent count, equal to one ``ltscale eval`` process's."""
    want = {e["id"]: e for e in ltscale_eval(setup, "stage3", tmp_path)}
    out = tmp_path / "lm"
    args = ["ltscale.lmeval", "--model_args", f"checkpoint={setup['ckpts']['stage3']},batch_size=3",
            "--tasks", TASK, "--include_path", str(setup["tasks"]), "--gen_kwargs", f"max_gen_toks={MAX_NEW}",
            "--output_path", str(out), "--log_samples"]  # fmt: skip
    proc = run_ranks("-m", nproc=2, args=args, timeout=300)  # torchrun -m ltscale.lmeval; env from _env
    assert "rank=0/2" in proc.stdout + proc.stderr  # a 2-rank process group, not two single runs
    (samples,) = out.glob(f"*/samples_{TASK}_*.jsonl")
    got = [json.loads(x) for x in samples.read_text().splitlines()]
    assert sorted(s["doc"]["id"] for s in got) == sorted(want)
    assert all(s["resps"][0][0] == want[s["doc"]["id"]]["generated_text"] for s in got)
    (log,) = out.glob("ltscale_latents_*.jsonl")
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    ids = {s["doc_id"]: s["doc"]["id"] for s in got}
    assert sorted(r["doc_id"] for r in rows) == sorted(ids)  # gathered from both ranks, each doc once
    assert all(r["num_latent"] == want[ids[r["doc_id"]]]["num_latent"] for r in rows)
