"""Host syncs per training step: ops that make the host wait for a value computed on the device.

On a GPU each one stalls the stream (the host cannot queue the next kernel until the value is
back). Counted on CPU with a dispatch mode (``SyncCounter``, also used by tests/unit/test_rollout.py,
which asserts the bound) over one forward + backward of the tiny latent model, 4 rows, 8 latents,
7 passes. Planning (``plan_rollout``) is counted apart: in this tree it reads CPU tensors only (the
ids stay on CPU), so its reads are no device syncs; a tree that plans on the ids' device pays them
on the device.
Run: ``.venv/bin/python bench/host_syncs.py``
"""

from __future__ import annotations

import torch
from common import main, md_table
from torch.utils._python_dispatch import TorchDispatchMode


class SyncCounter(TorchDispatchMode):
    """Counts ops that make the host wait for a device value: scalar reads (``item``,
    ``_local_scalar_dense``, ``is_nonzero``, ``equal``), ops whose output shape depends on the data
    (``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing, ``repeat_interleave``
    without ``output_size``), and the compiled fusion op, whose kernel reads its kept-set size
    (``ltscale/ops/csrc``: one sync per call).

    What it proves on CPU: no Python-visible op in the counted region needs a tensor's value on the
    host. What it cannot: syncs hidden inside a kernel other than the compiled op (the CUDA caching
    allocator, a C++ op copying to the host) and whether the stream really runs ahead (a GPU trace).
    tests/unit/test_rollout.py's ``meta``-device test is a second proof: there any data-dependent op fails.
    """

    SCALAR = {"item", "_local_scalar_dense", "is_nonzero", "equal"}
    DATA_SHAPED = {
        "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    }  # fmt: skip

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
            for t in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())
        )
        if (
            name in self.SCALAR
            or name in self.DATA_SHAPED
            or bool_index
            or (name == "repeat_interleave" and kwargs.get("output_size") is None)
            or (func.namespace == "ltscale" and name == "context_prediction_fusion_forward")
        ):
            self.ops.append(name)
        return func(*args, **kwargs)


def _batch(think: int):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 60, (4, 16), generator=gen)
    for b, c in [(0, 5), (0, 6), (0, 11), (1, 3), (3, 8), (3, 9), (3, 10), (3, 14)]:
        ids[b, c] = think
    mask = torch.zeros_like(ids)
    for b, n in enumerate([16, 13, 10, 15]):
        mask[b, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    return ids, mask, labels


def run(size: str = "full") -> dict:
    import ltscale.model.rollout as rollout
    from ltscale.model import LatentLM
    from tests.helpers import make_tiny_llama

    planning: list[str] = []
    real_plan = rollout.plan_rollout

    def counted_plan(*args, **kwargs):
        with SyncCounter() as c:
            out = real_plan(*args, **kwargs)
        planning.extend(c.ops)
        return out

    rollout.plan_rollout = counted_plan
    rows, results = [], []
    try:
        for mode, impl in (("hidden", "torch"), ("fusion", "torch"), ("fusion", "fused")):
            for packed in ("auto", "off"):
                base = make_tiny_llama(
                    64, kv_heads=2, max_positions=2048, isolated_rng=False, record_dtype=False
                )
                lm = LatentLM(base, 63, mode=mode, fusion_impl=impl, packed_passes=packed).train()
                ids, mask, labels = _batch(63)
                planning.clear()
                with SyncCounter() as c:
                    out = lm(ids, mask, labels, min_passes=7)
                    out.loss.backward()
                in_passes = len(c.ops) - len(planning)
                rows.append([mode, impl, packed, out.n_passes, len(c.ops), len(planning), in_passes,
                             f"{in_passes / out.n_passes:.2f}"])  # fmt: skip
                results.append({"mode": mode, "impl": impl, "packed": packed, "total": len(c.ops),
                                "planning": len(planning), "passes": in_passes})  # fmt: skip
    finally:
        rollout.plan_rollout = real_plan
    table = md_table(["mode", "fusion impl", "packed", "passes", "syncs/step", "in planning", "in passes",
                      "per pass"], rows)  # fmt: skip
    print(table)
    worst = max(r["passes"] for r in results)
    return {"bench": "host syncs", "table": table, "rows": results,
            "headline": f"at most {worst} syncs in the passes of a 7-pass step"}  # fmt: skip


if __name__ == "__main__":
    main(run, one_thread=False)
