"""Rank program for tests/dist/test_host_bytes.py: build a Llama-3.2-1B-shaped LatentLM the way the
trainer does (``run_setup.build_latent_model`` with the run's ZeRO-3 config, bf16) and measure this
process's host memory around it; rank 0 writes every rank's numbers to ``--out`` as JSON.

Host bytes are the kernel's count of resident pages (``/proc/self/status``): ``VmHWM``, the peak,
is reset right before the build (``/proc/self/clear_refs``), and ``VmRSS`` after it is read once
freed memory has been handed back to the kernel (``malloc_trim``). Both include what torch,
DeepSpeed and gloo allocate for the build, not only tensors.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ltscale.run_config import load_config  # noqa: E402
from ltscale.engine import dist  # noqa: E402
from ltscale.engine.ds_config import render_ds_config  # noqa: E402
from ltscale.engine.engine import count_parameters  # noqa: E402
from ltscale.run_setup import RunData, build_latent_model  # noqa: E402

# Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 128256, tied.
LLAMA_1B = [
    "model.init.hidden_size=2048", "model.init.intermediate_size=8192", "model.init.num_hidden_layers=16",
    "model.init.num_attention_heads=32", "model.init.num_key_value_heads=8", "model.init.tie_word_embeddings=true",
    "model.init.max_position_embeddings=2048", "engine.precision=bf16",
]  # fmt: skip
VOCAB = 128256


class Vocabulary:
    """What building the model asks of a tokenizer: its size, EOS, and encoding the init token."""

    eos_token_id = 2

    def __len__(self) -> int:
        return VOCAB

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [7]


def status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    info = dist.init_distributed(timeout_s=300)
    cfg = load_config(None, LLAMA_1B)
    ds = render_ds_config(cfg.engine.ds_config, micro_batch=1, grad_accum=1, world_size=info.world_size,
                          grad_clip=1.0, precision="bf16")  # fmt: skip
    data = RunData(tokenizer=Vocabulary(), thinking_id=VOCAB - 1, train=[], eval_records=[])
    libc = ctypes.CDLL("libc.so.6")
    gc.collect()
    libc.malloc_trim(0)
    before = status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    lm = build_latent_model(cfg, data, ds)
    seconds = time.perf_counter() - t0
    peak = status()["VmHWM"]
    gc.collect()
    libc.malloc_trim(0)
    resident = status()["VmRSS"]
    mine = {
        "rank": info.rank, "seconds": seconds, "peak": peak - before, "resident": resident - before,
        "n_params": count_parameters(lm), "dtype": str(next(lm.parameters()).dtype),
        "partition_bytes": sum(getattr(prm, "ds_tensor", prm).numel() * prm.element_size() for prm in lm.parameters()),
        "whole_now": sum(prm.numel() for prm in lm.parameters()),  # parameters not partitioned away
    }  # fmt: skip
    everyone = dist.all_gather_object(mine)
    if info.is_main:
        Path(args.out).write_text(json.dumps({"world": info.world_size, "ranks": everyone}))
    dist.shutdown_distributed()


if __name__ == "__main__":
    main()
