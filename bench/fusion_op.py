"""Context-Prediction Fusion op: compiled ``ltscale._C`` vs the dense torch reference, forward + backward.

Grid: V in {32k, 128k}, d in {576, 2048, 4096}, batch in {8, 64}, fp32, one thread by default
(``--threads``). Reported: milliseconds per forward+backward (best of ``--reps``) for the dense
reference (``fusion_reference``: P @ E over the whole vocabulary), the sparse torch path
(``fusion_sparse_torch``) and the compiled op, and the ratio reference / compiled (goal >= 5x on
CPU). All three compute the same thing (values and the grads to hidden, logits and E).

Logits are LM-like: Gaussian noise (sd 2) plus a peaked head of ``--head`` tokens per row boosted
by log V + 3..5, so the head holds ~99% of the mass and top-p 0.9 keeps about ten tokens at every
V (column K: mean kept tokens per row). A flat distribution would keep
most of V and the sparse paths would approach the dense cost; ``--flat`` measures that case.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fusion_op.py [--quick] [--device cuda]

``--device cuda`` runs the same grid on a GPU (fp32 and bf16) and adds GB/s of the compiled
forward against the bytes it must touch (logits read + kept rows of E + hidden + out), next to a
measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from pathlib import Path

import torch

from ltscale.ops import fused_available, fusion_fused, fusion_reference, fusion_sparse_torch

KW = dict(alpha=0.6, temperature=1.0, top_p=0.9, exclude_token_id=7)


def make_inputs(n: int, V: int, d: int, E: torch.Tensor, head: int, flat: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g) * (0.5 if flat else 2.0)
    if not flat:
        # the head's boost grows with log V so it holds ~99% of the mass at every V, as in a
        # trained LM (the tail of V noise tokens would otherwise carry more mass as V grows)
        top = torch.randint(0, V, (n, head), generator=g)
        boost = math.log(V) + 3.0 + 2.0 * torch.rand(n, head, generator=g)
        logits.scatter_add_(1, top, boost)
    hidden = torch.randn(n, d, generator=g)
    return hidden.to(E.device, E.dtype), logits.to(E.device, E.dtype)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# CPU: process CPU time, not wall time. The bench machine is shared (2 cores, several users): wall
# time measures the neighbours; a single-threaded process's CPU time (user + sys: page faults of
# the fresh V x d gradient are real cost and count) does not. CUDA: wall time after a sync.
CLOCK = {"cpu": time.process_time, "cuda": time.perf_counter}


def time_fwd_bwd(fn, hidden, logits, E, reps: int, device: str) -> tuple[float, float]:
    """Best time (ms) of forward + backward with grads to all three inputs, and of the same plus
    one full read of ``E.grad`` (what the optimizer does next; the compiled op's CPU gradient is
    allocated lazily, so its untouched zero pages are only paged in by that read)."""
    best, best_read = float("inf"), float("inf")
    clock = CLOCK[device]
    for _ in range(reps + 1):  # first call warms up
        h, lg = hidden.detach().requires_grad_(), logits.detach().requires_grad_()
        E.grad = None
        sync(device)
        t0 = clock()
        out = fn(h, lg, E, **KW)
        out.backward(torch.ones_like(out))
        sync(device)
        t1 = clock()
        E.grad.sum().item()
        t2 = clock()
        best, best_read = min(best, t1 - t0), min(best_read, t2 - t0)
        del out, h, lg
    E.grad = None
    return 1e3 * best, 1e3 * best_read


def time_fwd(fn, hidden, logits, E, reps: int, device: str) -> float:
    best = float("inf")
    with torch.no_grad():
        for _ in range(reps + 1):
            sync(device)
            t0 = time.perf_counter()
            fn(hidden, logits, E, **KW)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def copy_bandwidth(device: str) -> float:
    x = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() / best / 1e9  # read + write


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 | float16")
    p.add_argument("--vocab", type=int, nargs="+", default=[32_000, 128_000])
    p.add_argument("--dim", type=int, nargs="+", default=[576, 2048, 4096])
    p.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--head", type=int, default=16, help="peaked tokens per row")
    p.add_argument("--flat", action="store_true", help="flat logits: top-p keeps most of V")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="V=32k, d=576, batch 8 only (smoke run)")
    args = p.parse_args()
    if not fused_available():
        print("ltscale._C is not built: nothing to compare (run `make install`)")
        return 1
    if args.quick:
        args.vocab, args.dim, args.batch = [32_000], [576], [8]
    torch.set_num_threads(args.threads)
    dtypes = (
        [getattr(torch, args.dtype)]
        if args.dtype
        else ([torch.float32] if args.device == "cpu" else [torch.float32, torch.bfloat16])
    )
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
        f"logits {'flat' if args.flat else f'peaked (head {args.head})'}, top_p {KW['top_p']}, fwd+bwd, "
        f"best of {args.reps}, clock {'process CPU time' if args.device == 'cpu' else 'wall'}"
    )
    if args.device == "cuda":
        print(f"device copy bandwidth: {copy_bandwidth('cuda'):.0f} GB/s ({torch.cuda.get_device_name()})")
    head = (
        "| dtype | V | d | batch | K | dense ref ms | sparse torch ms | compiled ms | ref / compiled | "
        "sparse / compiled | ref / compiled, incl. E.grad read |"
    )
    if args.device == "cuda":
        head += " fwd GB/s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    results: list[dict] = []
    for dtype in dtypes:
        for V in args.vocab:
            for d in args.dim:
                E = torch.randn(V, d, dtype=dtype, device=args.device).requires_grad_()
                for n in args.batch:
                    hidden, logits = make_inputs(n, V, d, E, args.head, args.flat)
                    with torch.no_grad():
                        w = torch.ops.ltscale.context_prediction_fusion_forward(
                            hidden,
                            logits,
                            E,
                            KW["alpha"],
                            KW["temperature"],
                            KW["top_p"],
                            KW["exclude_token_id"],
                        )[2]
                        k_mean = float((w != 0).sum(1).float().mean())
                    t_ref, r_ref = time_fwd_bwd(fusion_reference, hidden, logits, E, args.reps, args.device)
                    t_sparse, _ = time_fwd_bwd(fusion_sparse_torch, hidden, logits, E, args.reps, args.device)
                    t_fused, r_fused = time_fwd_bwd(fusion_fused, hidden, logits, E, args.reps, args.device)
                    row = (
                        f"| {str(dtype).replace('torch.', '')} | {V} | {d} | {n} | {k_mean:.1f} | {t_ref:.2f} | "
                        f"{t_sparse:.2f} | {t_fused:.2f} | {t_ref / t_fused:.1f}x | {t_sparse / t_fused:.1f}x | "
                        f"{r_ref / r_fused:.1f}x |"
                    )
                    if args.device == "cuda":
                        t = time_fwd(fusion_fused, hidden, logits, E, args.reps, args.device)
                        touched = (logits.numel() + 2 * hidden.numel() + k_mean * n * d) * E.element_size()
                        row += f" {touched / t / 1e6:.0f} |"
                    print(row, flush=True)
                    results.append(
                        {
                            "dtype": str(dtype),
                            "V": V,
                            "d": d,
                            "batch": n,
                            "K": k_mean,
                            "ref_ms": t_ref,
                            "sparse_ms": t_sparse,
                            "compiled_ms": t_fused,
                            "ratio": t_ref / t_fused,
                            "ratio_incl_grad_read": r_ref / r_fused,
                        }
                    )
                    del hidden, logits
                del E
                gc.collect()
    if os.environ.get("LTSCALE_BENCH_JSON"):  # bench/run_all.py's summary row: the worst cell
        Path(os.environ["LTSCALE_BENCH_JSON"]).write_text(json.dumps({
            "headline": min(r["ratio"] for r in results),
            "min_ratio_incl_grad_read": min(r["ratio_incl_grad_read"] for r in results),
            "rows": results}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
