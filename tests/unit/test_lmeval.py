"""The lm-eval backend's rules, without training: stop strings, generation settings, prompt encoding,
task files and their scoring, model-argument errors, explicit-mode log-likelihood.

Reference implementations are lm-eval's own: its HF backend's stop-string cut
(``postprocess_generated_text``), its task loader and filter pipeline, and its HF model
(``lm_eval.models.huggingface.HFLM``) for log-likelihoods. CPU only: on a GPU the backend runs the
same code on another device, which these tests do not exercise.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ltscale.data.formatting import plain_prompt_text, prompt_ids
from ltscale.lmeval.decode import context_ids, cut_at_stops, greedy_settings, stop_settled
from ltscale.lmeval.tasks import PLAIN_TEXT, write_tasks
from tests.helpers import require_lm_eval

SMALL = [
    "model.init.hidden_size=32", "model.init.intermediate_size=64", "model.init.num_hidden_layers=2",
    "model.init.tie_word_embeddings=false", "model.tokenizer_vocab_size=120",
    "data.synthetic.n_train=64", "data.synthetic.n_test=8",
]  # fmt: skip


@pytest.fixture(scope="module")
def lm_eval_utils():
    require_lm_eval()
    from lm_eval.models import utils

    return utils


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny checkpoint (trainer's tokenizer and model builders), saved as a stage export."""
    from ltscale.model.io import save_latent_model
    from ltscale.run_config import load_config
    from ltscale.run_setup import build_latent_model, prepare_data

    root = tmp_path_factory.mktemp("lmeval_ckpt")
    cfg = load_config(None, [*SMALL, f"run_dir={root}"])
    data = prepare_data(cfg, root)
    lm = build_latent_model(cfg, data)
    hf = root / "stage1" / "hf"
    save_latent_model(
        hf,
        config=lm.base.config,
        latent_state=lm.state_dict(),
        tokenizer=data.tokenizer,
        latent_config=lm.latent_config(),
    )
    return hf


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


# ------------------------------------------------------------------------------ stop strings

CASES = [
    ("## Step 1: 2+2=4\n### 4", []),
    ("## Step 1: 2+2=4\n### 4", ["Question:", "</s>"]),
    ("### 4\n\nQuestion: next", ["Question:", "\n\n"]),
    ("abcabc", ["bc", "ab"]),  # overlapping: lm-eval's order-dependent split
    ("abcabc", ["ab", "bc"]),
    ("<thinking><thinking>### 7</s>junk", ["</s>"]),
    ("no stop here", ["", "zzz"]),  # '' is skipped (seq2seq eos)
    ("Q: a\nA: b\nQ:", ["Q:"]),
    ("", ["x"]),
    ("xx", ["x"]),
]


@pytest.mark.parametrize(("text", "stops"), CASES)
def test_cut_at_stops_equals_lm_eval_hf_backend(lm_eval_utils, text, stops) -> None:
    assert cut_at_stops(text, stops) == lm_eval_utils.postprocess_generated_text(text, list(stops), None)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab\n#<>", max_size=24),
    stops=st.lists(st.text(alphabet="ab\n#<>", max_size=3), max_size=4),
)
def test_cut_at_stops_equals_lm_eval_on_random_strings(text, stops) -> None:
    require_lm_eval()
    from lm_eval.models.utils import postprocess_generated_text

    assert cut_at_stops(text, stops) == postprocess_generated_text(text, list(stops), None)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab\n#", max_size=20),
    stops=st.lists(st.text(alphabet="ab\n#", max_size=3), max_size=4),
)
def test_a_settled_prefix_is_cut_as_every_continuation(text, stops) -> None:
    """Decoding may stop at the first prefix that is settled: its cut is the full text's."""
    for n in range(len(text) + 1):
        if stop_settled(text[:n], stops):
            assert cut_at_stops(text[:n], stops) == cut_at_stops(text, stops), n
    first = next((s for s in stops if s), None)
    if first is not None:  # the first stop string in order settles as soon as it occurs
        assert all(stop_settled(text[:n], stops) == (first in text[:n]) for n in range(len(text) + 1)
                   if not any(s and s in text[:n] for s in stops if s != first))  # fmt: skip


@pytest.mark.parametrize(
    ("text", "stops", "settled"),
    [
        ("abc", ["cd", "bc"], False),  # 'cd' may still start at the 'c' and cut before 'bc'
        ("abcd", ["cd", "bc"], True),
        ("abcx", ["cd", "bc"], True),  # 'cd' can no longer start before 'bc' ends
        ("ab", ["b"], True),
        ("ab", ["", "x"], False),
        ("a\ufffd", ["\ufffd"], False),  # an incomplete UTF-8 character is not text yet
    ],
)
def test_stop_settled_cases(text, stops, settled) -> None:
    assert stop_settled(text, stops) is settled


# ------------------------------------------------------------------------------ generation settings


def test_greedy_settings_accepts_lm_evals_spellings() -> None:
    assert greedy_settings({"until": "Q:", "do_sample": False, "temperature": 0.0}, default_max=256, where="t") == (
        ["Q:"], 256)  # fmt: skip
    assert greedy_settings(
        {"max_new_tokens": 9, "max_gen_toks": 5, "top_p": 0.9}, default_max=1, where="t"
    ) == ([], 5)
    assert greedy_settings({"max_tokens": 7, "until": None}, default_max=1, where="t") == ([], 7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"do_sample": True, "temperature": 0.7}, "task gsm8k_cot_self_consistency: sampling"),
        ({"temperature": 0.5}, "sampling"),
        ({"num_beams": 4}, r"unsupported generation kwargs \['num_beams'\]"),
        ({"max_gen_toks": 0}, "max_gen_toks must be >= 1"),
        ({"until": [1]}, "until must be strings"),
    ],
)
def test_greedy_settings_rejects_what_it_cannot_do(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        greedy_settings(kwargs, default_max=256, where="task gsm8k_cot_self_consistency")


# ------------------------------------------------------------------------------ prompt encoding


@pytest.mark.parametrize(
    "question", ["Tom has 3 apples. How many?", "What is <thinking> 2 + 2?", "  spaced \n q "]
)
def test_ltscale_prompt_is_encoded_by_the_formatting_module(tokenizer, question) -> None:
    assert context_ids(tokenizer, plain_prompt_text(question)) == prompt_ids(
        tokenizer, question, use_chat_template=False
    )


def test_other_contexts_get_bos_and_the_text(tokenizer) -> None:
    text = "Question: a\nAnswer: 4\n\nQuestion: b\nAnswer:"
    ids = context_ids(tokenizer, text)
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:] == tokenizer.encode(text, add_special_tokens=False)


def test_chat_user_turn_is_ltscales_chat_prompt(tokenizer) -> None:
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = (
        "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    chat = [{"role": "user", "content": "Tom has 3 apples. How many?"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert context_ids(tok, rendered, chat) == prompt_ids(tok, chat[0]["content"], use_chat_template=True)
    two = [{"role": "system", "content": "Be brief."}, *chat]
    rendered = tok.apply_chat_template(two, tokenize=False, add_generation_prompt=True)
    assert context_ids(tok, rendered, two) == tok.encode(rendered, add_special_tokens=False)


def test_a_methods_prompt_suffix_comes_with_its_decoding(checkpoint, tokenizer) -> None:
    """The ids lm-eval contexts get appended are the method's own (``Inference.prompt_suffix``)."""
    from ltscale.inference import inference_for
    from ltscale.lmeval.decode import Loaded, load

    assert load(checkpoint).suffix == []
    loaded = load(checkpoint)
    meta = {"coconut": {"n_latent": 2, "bot_id": 7, "eot_id": 8}}
    coconut = Loaded(inference_for(loaded.lm, tokenizer, method="coconut", meta=meta))
    assert coconut.suffix == [7] and coconut.method == "coconut"
    assert coconut.inference.prompt_ids("What is 1 + 2?") == [*prompt_ids(tokenizer, "What is 1 + 2?"), 7]


# ------------------------------------------------------------------------------ task files and scoring

RESPONSES = [
    ("## Step 1: 9+9=18\nThe final answer is:\n### 18", "18"),
    ("### 18.0", "18"),  # numeric only
    ("#### 1,000", "1000"),
    ("<thinking>## Step 1: x\n### <thinking>7", "7"),
    ("the answer is 18", "18"),  # no '#': whole text, wrong under both rules
    ("### 18</s>", "18"),
    ("### $18.", "18"),  # numeric only
    ("### 3/4", "0.75"),  # numeric only
    ("### -3", "-3"),
    ("", "5"),
    ("### 5 apples", "5"),  # numeric only
]


def test_task_scoring_matches_ltscale_eval(tmp_path, monkeypatch) -> None:
    """The shipped YAML, loaded and run by lm-eval (filters + metrics), scores responses exactly as
    ``ltscale eval`` does (``extract_answer`` + ``official_correct`` / ``numeric_correct``)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager, get_task_dict

    from ltscale.eval.extraction import extract_answer, numeric_correct, official_correct

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    data = tmp_path / "recs.jsonl"
    data.write_text("".join(
        json.dumps({"id": f"r{i}", "question": f"q {i}?", "steps": ["s"], "answer": gold}) + "\n"
        for i, (_, gold) in enumerate(RESPONSES)
    ))  # fmt: skip
    assert write_tasks(tmp_path / "tasks", [], files={"unit": str(data)}) == [
        "ltscale_unit",
        "ltscale_unit_chat",
    ]
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    task = get_task_dict(["ltscale_unit"], tm)["ltscale_unit"]
    task.build_all_requests(limit=None, rank=0, world_size=1)
    for inst in task.instances:
        inst.resps.append(RESPONSES[inst.doc_id][0])
    task.apply_filters()
    docs = {i: d for i, d in task.doc_iterator(rank=0, limit=None, world_size=1)}
    for inst in sorted(task.instances, key=lambda x: x.doc_id):
        text, gold = RESPONSES[inst.doc_id]
        assert inst.args[0] == plain_prompt_text(docs[inst.doc_id]["question"])
        got = task.process_results(docs[inst.doc_id], [inst.filtered_resps["extract"]])
        pred = extract_answer(text)
        assert inst.filtered_resps["extract"] == pred
        assert got == {
            "official": float(official_correct(pred, gold)),
            "numeric": float(numeric_correct(pred, gold)),
        }


def test_plain_template_renders_ltscales_prompt() -> None:
    require_lm_eval()
    from lm_eval.utils import apply_template

    for q in ("Tom has 3 apples.", "Line one\nline two {x}", "<thinking> and 'quotes' \"too\""):
        assert apply_template(PLAIN_TEXT, {"question": q}) == plain_prompt_text(q)


def test_data_pack_tasks_hold_ltscale_eval_records(data_dir, tmp_path, monkeypatch) -> None:
    from ltscale.eval.benchmarks import load_benchmark

    monkeypatch.setenv("LTSCALE_DATA_DIR", str(data_dir))
    names = write_tasks(tmp_path, ["gsm8k", "svamp", "asdiv"])
    assert names == [f"ltscale_{n}{s}" for n in ("gsm8k", "svamp", "asdiv") for s in ("", "_chat")] + [
        "ltscale_math", "ltscale_math_chat"]  # fmt: skip
    for name in ("gsm8k", "svamp", "asdiv"):
        rows = [json.loads(x) for x in (tmp_path / "data" / f"{name}.jsonl").read_text().splitlines()]
        records = load_benchmark(name)
        assert [(r["id"], r["question"], r["answer"]) for r in rows] == [
            (r.id, r.question, r.answer) for r in records
        ]
    group = (tmp_path / "ltscale_math.yaml").read_text()
    assert "weight_by_size: false" in group and "task: [ltscale_gsm8k, ltscale_svamp, ltscale_asdiv]" in group


def test_missing_data_pack_skips_its_tasks_but_writes_tiny(tmp_path, monkeypatch) -> None:
    from ltscale.run_config import load_config
    from ltscale.run_setup import load_split_records

    monkeypatch.setenv("LTSCALE_DATA_DIR", str(tmp_path / "nowhere"))
    assert write_tasks(tmp_path / "t") == ["ltscale_tiny", "ltscale_tiny_chat"]
    rows = (tmp_path / "t" / "data" / "tiny.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in rows] == [
        r.id for r in load_split_records(load_config(None), "eval")
    ]
    # max_gen_toks: configs/tiny.yaml's eval.max_new_tokens
    assert "max_gen_toks: 96" in (tmp_path / "t" / "ltscale_tiny.yaml").read_text()
    from ltscale.data.records import DataError

    with pytest.raises(DataError, match="missing.jsonl: no such file"):  # a file the user named: raised
        write_tasks(tmp_path / "t", [], files={"x": str(tmp_path / "missing.jsonl")})


def test_makefile_installs_the_eval_extra(repo_root) -> None:
    import tomllib

    extra = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "eval"
    ]
    m = re.search(r"^EVAL_EXTRA\s*:?=\s*(.+)$", (repo_root / "Makefile").read_text(), re.M)
    assert m and m.group(1).split() == extra
    assert "$(EVAL_EXTRA)" in (repo_root / "Makefile").read_text().split("$(STAMP): |", 1)[1]


# ------------------------------------------------------------------------------ the backend


def _backend(checkpoint, **kw):
    require_lm_eval()
    from ltscale.lmeval.backend import LTScaleLM

    return LTScaleLM.create_from_arg_obj(
        {"checkpoint": str(checkpoint), **kw}, {"batch_size": 1, "device": "cuda:0"}
    )


def test_bad_model_args_name_the_key_and_the_valid_ones(checkpoint) -> None:
    require_lm_eval()
    from ltscale.lmeval.backend import ModelArgsError

    with pytest.raises(ModelArgsError) as e:  # one line: `ltscale lm-eval` prints it as is
        _backend(checkpoint, temprature=0.5)
    assert "unknown key 'temprature'" in str(e.value) and "checkpoint, method, without_thinking" in str(
        e.value
    )
    assert "\n" not in str(e.value)
    for kw, match in [
        ({"batch_size": "auto"}, "batch_size='auto': expected a positive integer"),
        ({"mode": "latent"}, "mode='latent'"),
        ({"without_thinking": "maybe"}, "without_thinking='maybe'"),
        ({"method": "nope"}, "method: 'nope' is not one of"),
        ({"max_batch_size": 64}, "--max_batch_size only bounds --batch_size auto"),
    ]:
        with pytest.raises(ModelArgsError, match=re.escape(match)):
            _backend(checkpoint, **kw)
    with pytest.raises(ModelArgsError, match="checkpoint=.*missing.*does not exist"):
        _backend(checkpoint.parent / "missing")


def test_model_args_win_over_the_harness_and_cuda_means_cpu_here(checkpoint) -> None:
    lm = _backend(checkpoint, batch_size=4)
    assert lm.batch_size == 4
    assert lm.device == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert _backend(checkpoint).batch_size == 1  # the harness's --batch_size when model_args has none


class _Req:
    """The parts of lm-eval's ``Instance`` the backend reads."""

    def __init__(self, args, task="t", doc_id=0, repeats=1):
        self.args, self.task_name, self.doc_id, self.repeats = args, task, doc_id, repeats


def test_generate_until_stops_at_the_stop_string_cuts_logs_and_keeps_padded_copies_once(
    checkpoint, tokenizer, tmp_path, lm_eval_utils
) -> None:
    """A random model never emits EOS. Request 0's stop string ends its row at the first token whose
    text contains it, and its slot (2 rows in flight) goes to request 2 while request 1 runs on to
    max_gen_toks; every answer is lm-eval's cut of the full decode. The sample log holds one record
    per (doc, repeat) even when lm-eval pads a rank with a copy."""
    from ltscale.eval.evaluate import decode_generated
    from ltscale.lmeval.decode import generate

    log = tmp_path / "latents.jsonl"
    lm = _backend(checkpoint, batch_size=2, latent_log=str(log))
    questions = ["Tom has 3 apples. How many?", "Ann has 5 pens and loses 2. How many?", "x?"]
    kwargs = {"until": ["</s>"], "max_gen_toks": 12}
    reqs = [_Req((plain_prompt_text(q), kwargs), doc_id=i) for i, q in enumerate(questions)]
    reqs.append(reqs[-1])  # lm-eval's rank padding repeats the last request
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    full = generate(lm._loaded, prompts, max_new_tokens=12, slots=1)
    inf = lm._loaded.inference
    ids = inf.generate_many(prompts[:1], 12, slots=1, eos_token_id=None).sequences[0].tolist()
    texts = [decode_generated(tokenizer, ids[:n], inf.thinking_token_id) for n in range(13)]
    assert texts[-1] == full[0].text
    stop = full[0].text[len(texts[3]) - 2 : len(texts[3])]  # completed by the 3rd token
    assert stop and stop not in texts[2], "pick a stop string the 3rd token completes"
    reqs[0].args = (reqs[0].args[0], {**kwargs, "until": [stop]})
    out = lm.generate_until(reqs)
    want = [lm_eval_utils.postprocess_generated_text(g.text, [stop if i == 0 else "</s>", "</s>"], None)
            for i, g in enumerate(full)]  # fmt: skip
    assert out[:3] == want and out[3] == out[2] and out[0] != full[0].text
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(r["task"], r["doc_id"], r["repeat"]) for r in rows] == [("t", 0, 0), ("t", 1, 0), ("t", 2, 0)]
    assert [r["num_generated"] for r in rows] == [3, 12, 12] and not rows[0]["truncated"]
    assert [r["generated_text"] for r in rows] == [texts[3], full[1].text, full[2].text]
    assert rows[0]["response"] == out[0]


def test_loglikelihood_is_explicit_mode_scoring_equal_to_lm_evals_hf_model(checkpoint, monkeypatch) -> None:
    """Equal to lm-eval's HF model on the same export once the export's padded vocabulary rows are
    masked (they are never a token; the raw HF model gives their zero rows logit 0, which moves
    every score of a weak model, so the raw model must differ here). Also: every batch reaches the
    model through ``to_device`` (tests/unit/test_device.py says what that can and cannot show on CPU)."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    from ltscale.lmeval import backend
    from tests.helpers import HostToDevice
    from tests.unit.test_device import Spy

    ours = _backend(checkpoint, batch_size=3)
    hf = HFLM(pretrained=str(checkpoint), device="cpu", batch_size=2, dtype="float32")
    pairs = [("Question: Tom has 3 apples.\nAnswer:\n", "## Step 1: 3+1=4"), ("", "plain text"),
             ("Ann has", " 5 pens"), ("a " * 40, "b b b")]  # fmt: skip
    reqs = [_Req(p) for p in pairs]
    spy, fed = Spy(), []
    monkeypatch.setattr(backend, "to_device", spy)
    ours._loaded.lm.base.register_forward_pre_hook(
        lambda m, a, kw: fed.append(id(kw["input_ids"]) in spy.moved), with_kwargs=True
    )
    with HostToDevice() as moves:
        got = ours.loglikelihood(reqs)
    assert moves.found == [] and fed == [True, True] and set(spy.devices) == {ours.device}
    n_tokens = len(ours.tokenizer)
    assert ours._loaded.lm.base.get_input_embeddings().weight.shape[0] > n_tokens, "the export must be padded"
    raw = hf.loglikelihood(reqs)
    raw_call = hf._model_call

    def masked_call(*args, **kw):
        logits = raw_call(*args, **kw).clone()
        logits[..., n_tokens:] = torch.finfo(logits.dtype).min
        return logits

    monkeypatch.setattr(hf, "_model_call", masked_call)
    want = hf.loglikelihood(reqs)
    for (g, gg), (w, wg), (r, _) in zip(got, want, raw, strict=True):
        assert g == pytest.approx(w, rel=1e-5, abs=1e-4) and gg == wg
        assert g != pytest.approx(r, rel=1e-5, abs=1e-4)
    rolling = [_Req(("The final answer is:\n### 18 " * 3,))]
    assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(
        hf.loglikelihood_rolling(rolling)[0], rel=1e-5
    )


def test_entry_point_without_lm_eval_is_one_line(monkeypatch, capsys) -> None:
    from ltscale.lmeval.entry import main

    monkeypatch.setitem(sys.modules, "lm_eval._cli.harness", None)  # import fails as if not installed
    assert main(["--tasks", "ltscale_tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("ltscale lm-eval: error: lm-evaluation-harness is not installed") and "\n" not in err
    )


def test_offline_copies_of_lm_evals_gsm8k_tasks(data_dir, tmp_path, monkeypatch) -> None:
    """``gsm8k_offline`` is lm-eval's ``gsm8k`` (5-shot "Question: ...\\nAnswer: ... #### N") reading
    the data pack's raw GSM8K files; ``gsm8k_cot_offline`` likewise for ``gsm8k_cot``."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager, get_task_dict

    monkeypatch.setenv("LTSCALE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    names = write_tasks(tmp_path / "t")
    assert names[-2:] == ["gsm8k_offline", "gsm8k_cot_offline"]
    tasks = get_task_dict(
        ["gsm8k_offline", "gsm8k_cot_offline"],
        TaskManager(include_path=str(tmp_path / "t"), include_defaults=False),
    )
    plain, cot = tasks["gsm8k_offline"], tasks["gsm8k_cot_offline"]
    assert plain.config.num_fewshot == 5 and cot.config.num_fewshot == 8
    assert [f["name"] for f in plain.config.filter_list] == ["strict-match", "flexible-extract"]
    plain.build_all_requests(limit=1, rank=0, world_size=1)
    context = plain.instances[0].args[0]
    assert context.count("Question: ") == 6 and context.count("#### ") == 5 and context.endswith("\nAnswer:")
    first_test_question = "Janet’s ducks lay 16 eggs"
    assert context.rsplit("Question: ", 1)[1].startswith(first_test_question)


def test_apply_chat_template_requests_decode_from_ltscales_chat_prompt(tmp_path, caplog) -> None:
    """``--apply_chat_template`` on a Qwen2.5-format tokenizer (offline stand-in): the backend renders
    the chat, recognises the rendered context and decodes from ltscale's chat prompt ids; a plain
    request on the same checkpoint is decoded as given, with a warning."""
    from ltscale.data import load_tokenizer
    from ltscale.data.tokenizer import add_thinking_token
    from ltscale.lmeval.decode import generate
    from ltscale.model import LatentLM
    from ltscale.model.io import save_latent_model
    from tests.fixtures.chat_tokenizers import build
    from tests.helpers import make_tiny_llama

    tok = load_tokenizer(str(build("qwen2.5-instruct", tmp_path / "tok")))
    think = add_thinking_token(tok)
    lm = LatentLM(make_tiny_llama(len(tok), dtype=torch.float32), think, mode="cot")
    hf = tmp_path / "hf"
    save_latent_model(hf, config=lm.base.config, latent_state=lm.state_dict(), tokenizer=tok,
                      latent_config=lm.latent_config())  # fmt: skip
    backend = _backend(hf, batch_size=2)
    questions = ["Tom has 3 apples. How many?", "Ann has 5 pens and loses 2. How many?"]
    contexts = [backend.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    assert all(c.startswith("<|im_start|>system") and c.endswith("<|im_start|>assistant\n") for c in contexts)
    kwargs = {"until": [], "max_gen_toks": 4}
    out = backend.generate_until([_Req((c, kwargs), doc_id=i) for i, c in enumerate(contexts)])
    prompts = [prompt_ids(backend.tokenizer, q, use_chat_template=True) for q in questions]
    want = generate(backend._loaded, prompts, max_new_tokens=4, slots=2)
    assert out == [cut_at_stops(g.text, ["<|im_end|>"]) for g in want]
    assert [backend._prompt(c) for c in contexts] == prompts
    with caplog.at_level("WARNING"):
        backend.generate_until([_Req((plain_prompt_text(questions[0]), kwargs))])
    assert "pass --apply_chat_template" in caplog.text
