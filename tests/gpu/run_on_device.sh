#!/usr/bin/env bash
# On a lent GPU machine (one H200, no network, its own preinstalled torch): build ltscale._C with
# its CUDA kernel, run the GPU tier and the fused-op kernel bench. Budget: <= 5 minutes.
#
#   bash tests/gpu/run_on_device.sh          # from the repository root; logs go to $OUT (or /tmp)
#
# Build: `pip install --no-build-isolation --no-deps -e .` against the machine's torch (nothing
# is downloaded). If pip refuses (an externally managed system Python), it falls back to
# `setup.py build_ext --inplace`, which installs nothing. FORCE_CUDA=1: a build without the CUDA
# kernel is an error here, not a fallback. TORCH_CUDA_ARCH_LIST defaults to 9.0 (H200 only: one
# arch compiles in about a minute); CUDA_HOME defaults to /usr/local/cuda, else nvcc's prefix.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/ltscale-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
T0=$(date +%s)
say() { echo "[gpu +$(($(date +%s) - T0))s] $*"; }

"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF

if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_HOME
  fi
fi
say "CUDA_HOME=${CUDA_HOME:-<none>} nvcc: $("${CUDA_HOME:-/nonexistent}/bin/nvcc" --version 2>/dev/null | grep -i release || echo missing)"
SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
INC=$(ls -d "$SP"/nvidia/cu*/include 2>/dev/null | head -1 || true)
[ -n "$INC" ] && export CUDA_INC_PATH="$INC"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1 LTSCALE_BUILD_EXT=auto
export MAX_JOBS=${MAX_JOBS:-8}

say "building ltscale._C (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
if ! timeout 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1; then
  say "pip install -e . failed (tail below); trying setup.py build_ext --inplace"
  tail -15 "$OUT/build.log"
  timeout 240 "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 || {
    tail -60 "$OUT/build.log"
    echo "BUILD FAILED" >&2
    exit 1
  }
fi
grep -E "^setup.py:" "$OUT/build.log" || true
say "build done"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" LTSCALE_REQUIRE_CUDA=1
rc=0
say "GPU tier"
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_fusion_cuda.py 2>&1 | tee "$OUT/gpu_tests.txt" || rc=1
else
  timeout 120 "$PY" tests/gpu/test_fusion_cuda.py 2>&1 | tee "$OUT/gpu_tests.txt" || rc=1
fi

say "kernel bench (fp32 + bf16, wall clock on the GPU)"
timeout 150 "$PY" bench/fusion_op.py --device cuda --reps 5 2>&1 | tee "$OUT/bench_fusion_cuda.md" || rc=1
say "done rc=$rc (logs in $OUT)"
exit $rc
