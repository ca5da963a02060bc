"""Stage exports written straight from the gathered state dict (``ltscale/model/hf_weights.py``):
plain transformers reloads them, in the state's dtype, and no model is built to write them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from ltscale import rundir
from ltscale.model.hf_weights import write_hf_weights, write_safetensors
from ltscale.model.io import save_latent_model
from tests.helpers import make_tiny_llama


def test_streamed_safetensors_read_back_with_the_reference_reader(tmp_path):
    tensors = {
        "bf16": torch.randn(5, 7).to(torch.bfloat16),
        "f64": torch.randn(3, dtype=torch.float64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "ints": torch.arange(9, dtype=torch.int64).view(3, 3),
        "strided": torch.randn(4, 6).t(),  # not contiguous
        "flag": torch.tensor([True, False]),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tie", [True, False])
def test_transformers_reloads_the_export_in_its_dtype(tmp_path, dtype, tie):
    model = make_tiny_llama(vocab_size=96, tie=tie, dtype=dtype).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shard = 3 * 96 * 32 * dtype.itemsize  # several shards: exercises the index
    files = write_hf_weights(tmp_path, model.config, state, max_shard_bytes=shard)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state) - ({"lm_head.weight"} if tie else set())
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.dtype == dtype and back.config.architectures == ["LlamaForCausalLM"]
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tie
    assert all(torch.equal(back.state_dict()[k], v) for k, v in state.items())
    model.save_pretrained(tmp_path / "ref")  # what transformers itself writes, loaded the same way
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "ref").eval()
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(
        (tmp_path / "ref" / "config.json").read_text()
    )
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_a_state_that_does_not_fit_names_the_tensors(tmp_path):
    model = make_tiny_llama(vocab_size=64)
    state = dict(model.state_dict())
    state.pop("model.norm.weight")
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    state["stray.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as err:
        write_hf_weights(tmp_path, model.config, state)
    msg = str(err.value)
    assert "missing=['model.norm.weight']" in msg and "'stray.weight'" in msg
    assert "model.layers.0.mlp.up_proj.weight: (3, 3) != (64, 32)" in msg


class NewCPUStorage(TorchDispatchMode):
    """Records every op whose output is a CPU tensor on a storage of at least ``limit`` bytes that
    did not exist before (``known``): an allocation, not a view of the state being written."""

    def __init__(self, known: set[int], limit: int):
        super().__init__()
        self.known, self.limit, self.ops = known, limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                s = t.untyped_storage()
                if s.nbytes() >= self.limit and s.data_ptr() not in self.known:
                    self.ops.append(str(func))
        return out


def test_the_export_builds_no_model_to_hold_the_weights(tmp_path):
    """The old export built the model from its config (random weights, in fp32) to load the state
    into: here no CPU storage of even half the embedding's size is allocated while writing."""
    from ltscale.data.tokenizer import load_tokenizer, train_sentencepiece

    train_sentencepiece(
        [f"question {i} has {i + 2} apples" for i in range(200)], tmp_path / "tok", vocab_size=80
    )
    tok = load_tokenizer(str(tmp_path / "tok"))
    model = make_tiny_llama(vocab_size=len(tok), hidden=64, dtype=torch.bfloat16)
    state = {f"base.{k}": v for k, v in model.state_dict().items()}
    emb = model.get_input_embeddings().weight
    meta = rundir.latent_meta(mode="cot", alpha=0.6, temperature=1.0, top_p=0.9, thinking_token_id=len(tok) - 1,
                              adapter=False, adapter_hidden=None)  # fmt: skip
    recorder = NewCPUStorage({t.untyped_storage().data_ptr() for t in state.values()}, emb.nbytes // 2)
    with recorder:
        save_latent_model(tmp_path / "hf", config=model.config, latent_state=state, tokenizer=tok,
                          latent_config=meta)  # fmt: skip
    assert recorder.ops == [], f"allocations while exporting: {recorder.ops}"
    assert (
        load_file(str(tmp_path / "hf" / "model.safetensors"))["model.embed_tokens.weight"].dtype
        == torch.bfloat16
    )


def test_the_export_stops_generation_at_the_tokenizers_eos(tmp_path):
    """Qwen2.5's base tokenizer ends chat turns with ``<|im_end|>`` but ships EOS ``<|endoftext|>``,
    as its model config does; ltscale moves the tokenizer's EOS to ``<|im_end|>`` and trains on it,
    so the export's configs name ``<|im_end|>`` as well (offline stand-in tokenizer)."""
    from transformers import AutoTokenizer, GenerationConfig

    from ltscale.data import load_tokenizer
    from ltscale.model import LatentLM
    from tests.fixtures.chat_tokenizers import build

    tok = load_tokenizer(str(build("qwen2.5-base", tmp_path / "tok")))
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tok.eos_token_id == im_end != endoftext
    base = make_tiny_llama(vocab_size=len(tok) + 2)
    base.config.eos_token_id = base.generation_config.eos_token_id = endoftext
    lm = LatentLM(base, len(tok), mode="fusion")
    hf = save_latent_model(tmp_path / "hf", config=base.config, latent_state=lm.state_dict(), tokenizer=tok,
                           latent_config=lm.latent_config())  # fmt: skip
    assert GenerationConfig.from_pretrained(hf).eos_token_id == im_end
    assert json.loads((hf / "config.json").read_text())["eos_token_id"] == im_end
    assert AutoTokenizer.from_pretrained(hf).eos_token_id == im_end
    assert base.config.eos_token_id == endoftext  # the live model's config is not changed
