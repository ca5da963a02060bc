#!/usr/bin/env bash
# CI compile proof for ltscale._C's CUDA kernel on a GPU-less machine (issue 5).
#
# The normal CI venv has a CPU torch, so `make install` builds only the C++ kernel and a broken
# .cu file would go unnoticed until someone gets a GPU. This step builds the real CUDAExtension
# against a CUDA build of torch in a SEPARATE venv (the facts it relies on: docs/GPU.md,
# "Compiling the CUDA kernel without a GPU") and fails on any compile error:
#   1. venv $LTSCALE_CUDA_VENV (default /tmp/ltscale-cuda-venv; reused when it already holds a
#      CUDA torch of the pinned version) with torch==2.14.1 (CUDA 13.0 build, ~5.5 GB, from the
#      machine's wheel mirror);
#   2. a copy of the tracked sources (never the checkout itself: an in-tree build would overwrite
#      the CPU venv's ltscale/_C*.so and share build/ objects) built with FORCE_CUDA=1, i.e. a
#      missing nvcc or CPU torch is an error, not a silent C++-only build;
#   3. cuobjdump --list-elf: a cubin for every arch of TORCH_CUDA_ARCH_LIST (default setup.py's
#      "8.0;9.0+PTX") must be inside the .so, and cuobjdump --list-ptx the PTX of every "+PTX"
#      arch (what a GPU newer than the build runs; cuobjdump: PATH, $CUDA_HOME/bin, or triton's copy);
#   4. import the installed .so on this GPU-less machine: CUDA kernel registered, CPU path equals
#      the torch reference (values + fp64 gradcheck).
# Every step runs under `timeout`. Needs nvcc (CUDA_HOME, default /usr/local/cuda, whose major
# version must match torch's CUDA 13). LTSCALE_SKIP_CUDA_COMPILE=1 skips it, saying so loudly.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
VENV=${LTSCALE_CUDA_VENV:-/tmp/ltscale-cuda-venv}
TORCH_SPEC=${LTSCALE_CUDA_TORCH:-torch==2.14.1}
ARCHS=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
T0=$(date +%s)

say() { echo "[cuda-compile +$(($(date +%s) - T0))s] $*"; }
die() {
  echo "[cuda-compile] FAILED: $*" >&2
  exit 1
}

if [ "${LTSCALE_SKIP_CUDA_COMPILE:-0}" = "1" ]; then
  echo "[cuda-compile] SKIPPED (LTSCALE_SKIP_CUDA_COMPILE=1): the CUDA kernel was NOT compiled" >&2
  exit 0
fi
[ -x "$CUDA_HOME/bin/nvcc" ] || die "no nvcc at CUDA_HOME=$CUDA_HOME (set CUDA_HOME to a CUDA 13 toolkit)"
say "nvcc: $("$CUDA_HOME/bin/nvcc" --version | grep -i release)"

# ---- 1. the CUDA-torch venv ---------------------------------------------------------------------
want=${TORCH_SPEC#torch==}
have_torch() {
  [ -x "$VENV/bin/python" ] && timeout 300 "$VENV/bin/python" -c "
import torch, sys
sys.exit(0 if torch.__version__.split('+')[0] == '$want' and torch.version.cuda else 1)" 2>/dev/null
}
if have_torch; then
  say "reusing $VENV"
else
  say "creating $VENV with $TORCH_SPEC (CUDA build, ~5.5 GB)"
  rm -rf "$VENV"
  timeout 300 python3 -m venv "$VENV"
  timeout 1200 "$VENV/bin/pip" install -q --progress-bar off "$TORCH_SPEC" 'setuptools>=64' wheel ||
    die "pip install $TORCH_SPEC"
  have_torch || die "$VENV has no CUDA build of $TORCH_SPEC"
fi
PY="$VENV/bin/python"
SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
say "$("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null)"

# ---- 2. build from a copy of the sources ----------------------------------------------------------
WORK=$(mktemp -d /tmp/ltscale-cuda-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/src"
# tracked + untracked-but-not-ignored files: the tree as CI (or the developer) has it, no .so/build
git ls-files -z -co --exclude-standard -- setup.py pyproject.toml README.md ltscale launcher |
  tar -C "$REPO" --null -T - -cf - | tar -C "$WORK/src" -xf -
ls "$WORK/src/ltscale/ops/csrc/"*.cu >/dev/null 2>&1 || die "no ltscale/ops/csrc/*.cu to compile"

# torch's cu13 wheels carry the CUDA library headers that /usr/local/cuda lacks (cusparse.h, ...)
INC=$(ls -d "$SP"/nvidia/cu*/include 2>/dev/null | head -1 || true)
[ -n "$INC" ] && export CUDA_INC_PATH="$INC"
export TORCH_CUDA_ARCH_LIST="$ARCHS" FORCE_CUDA=1 LTSCALE_BUILD_EXT=auto MAX_JOBS=${MAX_JOBS:-2}
say "building: CUDA_HOME=$CUDA_HOME CUDA_INC_PATH=${CUDA_INC_PATH:-} TORCH_CUDA_ARCH_LIST=$ARCHS"
tb=$(date +%s)
if ! (cd "$WORK" && timeout 1200 "$VENV/bin/pip" install --no-build-isolation --no-deps --force-reinstall \
  --progress-bar off -v "$WORK/src" >"$WORK/build.log" 2>&1); then
  grep -n -E "error|Error" "$WORK/build.log" | head -40 || true
  tail -60 "$WORK/build.log"
  die "building the CUDA extension (log above)"
fi
cp "$WORK/build.log" /tmp/ltscale-cuda-build.log  # kept for inspection
grep -E "^setup.py:" "$WORK/build.log" || true
say "nvcc/c++ warnings in the build log: $(grep -c -i 'warning' "$WORK/build.log" || true) (log: /tmp/ltscale-cuda-build.log)"
say "build OK in $(($(date +%s) - tb))s"
SO=$(ls "$SP"/ltscale/_C*.so 2>/dev/null | head -1)
[ -n "$SO" ] || die "no ltscale/_C*.so in $SP after the install"

# ---- 3. device code for every arch --------------------------------------------------------------
CUOBJDUMP=$(command -v cuobjdump || true)
[ -n "$CUOBJDUMP" ] || { [ -x "$CUDA_HOME/bin/cuobjdump" ] && CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"; } || true
[ -n "$CUOBJDUMP" ] || { [ -x "$SP/triton/backends/nvidia/bin/cuobjdump" ] && CUOBJDUMP="$SP/triton/backends/nvidia/bin/cuobjdump"; } || true
[ -n "$CUOBJDUMP" ] || die "no cuobjdump (PATH, \$CUDA_HOME/bin, triton's copy) to inspect the .so"
elfs=$(timeout 120 "$CUOBJDUMP" --list-elf "$SO") || die "cuobjdump --list-elf $SO"
echo "$elfs"
ptxs=$(timeout 120 "$CUOBJDUMP" --list-ptx "$SO") || die "cuobjdump --list-ptx $SO"
echo "$ptxs"
for a in ${ARCHS//;/ }; do
  sm="sm_$(echo "${a%+PTX}" | tr -d '.')"
  echo "$elfs" | grep -q "\.${sm}\.cubin" || die "no ${sm} cubin in $SO (TORCH_CUDA_ARCH_LIST=$ARCHS)"
  if [ "${a%+PTX}" != "$a" ]; then
    echo "$ptxs" | grep -q "\.${sm}\.ptx" || die "no ${sm} PTX in $SO (TORCH_CUDA_ARCH_LIST=$ARCHS asks for it)"
  fi
done
timeout 120 "$CUOBJDUMP" --dump-resource-usage "$SO" | grep -E "Function|REG" | head -8 || true
say "cubins and PTX present for: $ARCHS (checked with $CUOBJDUMP)"

# ---- 4. import on this GPU-less machine, run the CPU path -----------------------------------------
case "$ARCHS" in *+PTX*) export LTSCALE_WANT_PTX=1 ;; *) export LTSCALE_WANT_PTX=0 ;; esac
(cd "$WORK" && timeout 300 "$PY" - <<'EOF'
import os
import warnings

warnings.filterwarnings("ignore")
import torch

import ltscale._C as C
from ltscale.ops import fusion as F

info = F.fused_build_info()
print("ltscale._C:", C.__file__, info)
assert info["cpu"] and info["cuda"], f"kernels missing from the dispatcher: {info}"
if os.environ.get("LTSCALE_WANT_PTX") == "1":
    assert info["cuda_ptx"], f"the build records no PTX: {info}"
g = torch.Generator().manual_seed(0)
h, l, E = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 8), (5, 40), (40, 8)))
kw = dict(alpha=0.6, temperature=0.8, top_p=0.9, exclude_token_id=3)
torch.testing.assert_close(F.fusion_fused(h, 3 * l, E, **kw), F.fusion_reference(h, 3 * l, E, **kw))
args = (h[:3, :4].clone().requires_grad_(), l[:3, :12].clone().requires_grad_(), E[:12, :4].clone().requires_grad_())
assert torch.autograd.gradcheck(lambda a, b, c: F.fusion_fused(a, b, c, **kw), args)
print("CPU path == torch reference (values, fp64 gradcheck): OK;",
      "CUDA available here:", torch.cuda.is_available())
EOF
) || die "importing or running the built extension"
say "OK: CUDA kernel compiled for $ARCHS, .so imports and its CPU path is correct"
