"""The packages the GPU script relies on, asserted before it spends device time.

ltscale pins transformers and deepspeed (requirements.txt) because it relies on their internals:
transformers 5.x's cache API (the decoder's ``cache`` argument, ``DynamicCache(config=...)``, the
``AttentionInterface`` registry used by the packed passes) and its ZeRO-3 construction hooks
(``HfDeepSpeedConfig``); deepspeed's ZeRO-3 (``zero.Init``, ``GatheredParameters``). torch is the
machine's own CUDA build (2.13.0 is the CPU pin), so only a floor is checked, and on a GPU run
that it is a CUDA build that sees a device with bf16. ``datasets`` (insertion sites are an Arrow
dataset) must import with the machine's pyarrow.

    python tests/gpu/check_env.py OUT.json     # exit 1, every problem listed, when one fails
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TORCH_FLOOR = (2, 6)


def pinned(name: str) -> str:
    """``name``'s version pattern in requirements.txt (``5.24.*`` -> a regex)."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.fullmatch(rf"{re.escape(name)}==(\S+)", line.strip())
        if m:
            return re.escape(m.group(1)).replace(r"\*", r".*")
    raise SystemExit(f"requirements.txt pins no {name}")


def main() -> int:
    dry = os.environ.get("LTSCALE_GPU_DRYRUN") == "1"
    info: dict = {"dry_run": dry, "python": sys.version.split()[0]}
    problems: list[str] = []

    import torch

    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) < TORCH_FLOOR:
        problems.append(f"torch {torch.__version__} < {'.'.join(map(str, TORCH_FLOOR))}")
    if not dry:
        if not torch.cuda.is_available():
            problems.append(
                f"torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda})"
            )
        else:
            info["device"] = torch.cuda.get_device_name()
            info["capability"] = list(torch.cuda.get_device_capability())
            info["bf16"] = torch.cuda.is_bf16_supported()
            if not info["bf16"]:
                problems.append(f"{info['device']} has no bf16")

    for name in ("transformers", "deepspeed"):
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            problems.append(f"{name} does not import: {e}")
            continue
        info[name] = mod.__version__
        if not re.fullmatch(pinned(name), mod.__version__):
            problems.append(f"{name} {mod.__version__} is not the pinned {pinned(name).replace(chr(92), '')}")

    try:
        from transformers import AttentionInterface, DynamicCache, LlamaConfig
        from transformers.integrations.deepspeed import HfDeepSpeedConfig  # noqa: F401
        from transformers.models.llama.modeling_llama import LlamaModel

        if "cache" not in inspect.signature(LlamaModel.forward).parameters:
            problems.append(
                "transformers: the decoder has no `cache` argument (the rollout passes its KV cache so)"
            )
        DynamicCache(config=LlamaConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2))
        if not callable(getattr(AttentionInterface, "register", None)):
            problems.append("transformers: AttentionInterface.register is missing (packed passes)")
    except Exception as e:  # noqa: BLE001 - report every kind of breakage the same way
        problems.append(f"transformers cache/attention API: {type(e).__name__}: {e}")
    try:
        import deepspeed

        for attr in ("Init", "GatheredParameters", "register_external_parameter"):
            if not hasattr(deepspeed.zero, attr):
                problems.append(f"deepspeed.zero.{attr} is missing")
    except ImportError:
        pass  # reported above
    try:
        import datasets
        import pyarrow

        info["datasets"], info["pyarrow"] = datasets.__version__, pyarrow.__version__
    except Exception as e:  # noqa: BLE001
        problems.append(f"datasets does not import: {type(e).__name__}: {e}")

    info["problems"] = problems
    out = json.dumps(info, indent=2)
    print(out)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(out + "\n")
    for p in problems:
        print(f"check_env: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
