#!/bin/bash
# The prepared GPU run: the paper recipe's step, training and inference on one GPU.
#
#   benchmarks/gpu_run.sh [--tiny] [--budget-s=360]
#
# Phases, each writing its JSON to $OUT as it finishes (so a timeout still
# returns what was done), in at most 8 files:
#   smoke.json       versions, the device, one compiled step (fails fast, <= 60 s)
#   step_bf16.json   train step at 256x256, width 128, batch 8, JAX against the
#   step_f32.json    PyTorch twin where torch is installed (benchmarks/train_step.py)
#   paper_run.json   both stages on bottle at paper width, bfloat16, device
#                    SLIC, as many steps as the budget allows, evaluated at
#                    sigma 0 with the baseline rows (benchmarks/paper_run.py;
#                    its logs paper_train.log, paper_earlier.log)
#   inference.json   end-to-end detector against its networks alone, device
#                    SLIC per image (benchmarks/inference.py)
# and log.txt, everything printed. Data and wheels come from .gpu_carry/
# (benchmarks/gpu_carry.sh fills it; nothing can be fetched on the GPU machine).
#
# --tiny runs the same phases on a CPU in about a minute: the demo config
# (64x64, width 8, host SLIC in training), a small built-in demo set, a few
# steps; tests/test_gpu_run.py runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
tiny=0
budget=360
for arg in "$@"; do
  case $arg in
    --tiny) tiny=1 ;;
    --budget-s=*) budget=${arg#*=} ;;
    *) echo "unknown argument $arg (--tiny, --budget-s=SECONDS)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
scratch=$(mktemp -d)  # the paper run's workdir, the tiny demo's cache
trap 'rm -rf "$scratch"' EXIT
carry=.gpu_carry
if [ -d $carry/wheels ] && ls $carry/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_run_site $carry/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/gpu_run_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

common=(--config.data_cache=none --config.train.tensorboard=False)
if [ $tiny = 1 ]; then
  # Host SLIC in stage 2's workers: device SLIC on a CPU would be most of the minute.
  config=(--config=configs/demo.py "${common[@]}" --config.cache_dir="$scratch/cache"
          --config.demo.num_train=24 --config.demo.num_test_good=6
          --config.demo.num_test_per_defect=3 --config.eval.batch_size=8)
  step_args=(--steps=1 --rounds=1)
  limits=(40 40 40 40)  # smoke, each step phase, inference; paper run: what is left
  paper=(--reserve-s=40 --stage2-cost=1.5 --min-steps=2 --max-steps=8)
  images=8
else
  if [ ! -d $carry/mvtec_ad/bottle ] || [ ! -d $carry/dtd ]; then
    echo "$carry/mvtec_ad/bottle and $carry/dtd are missing: run benchmarks/gpu_carry.sh" >&2
    exit 1
  fi
  config=(--config=configs/mvtec.py "${common[@]}" --config.data_dir=$carry/mvtec_ad
          --config.category=bottle --config.anomaly_source_dir=$carry/dtd
          --config.model.compute_dtype=bfloat16 --config.refine.superpixels=device
          --config.eval.map_sigma=0
          --config.train.num_workers=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 )))
  step_args=(--steps=20 --rounds=5 --peak-tflops=989 --measured-tflops=790)
  limits=(60 75 75 45)
  # Stage 2 also runs stage 1 and the device SLIC of 8 images per step.
  paper=(--reserve-s=110 --stage2-cost=4)
  images=128
fi
torch=()
$PY -c 'import torch' 2>/dev/null && torch=(--compare-torch)

phase() {  # phase NAME LIMIT_S COMMAND...: runs it, its output to log.txt
  local name=$1 limit=$2 t0
  shift 2
  t0=$(date +%s)
  echo "=== $name (limit $limit s)" | tee -a "$OUT/log.txt"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt"
  local rc=${PIPESTATUS[0]}
  echo "=== $name rc $rc after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/log.txt"
  return "$rc"
}

phase smoke "${limits[0]}" $PY benchmarks/gpu_smoke.py "${config[@]}" \
  --json="$OUT/smoke.json" || exit 1
for dtype in bfloat16:bf16 float32:f32; do
  phase "step ${dtype%:*}" "${limits[1]}" $PY benchmarks/train_step.py "${config[@]}" \
    --dtype=${dtype%:*} "${step_args[@]}" "${torch[@]}" --json="$OUT/step_${dtype#*:}.json"
done
paper_budget=$(( budget - ($(date +%s) - start) - limits[3] ))
workdir=$scratch/paper_run
phase "paper run" "$paper_budget" $PY benchmarks/paper_run.py --budget-s=$paper_budget \
  --step-json="$OUT/step_bf16.json" --workdir="$workdir" --json="$OUT/paper_run.json" \
  "${paper[@]}" -- "${config[@]}"
cp "$workdir.train.log" "$OUT/paper_train.log" 2>/dev/null
cp "$workdir.earlier.log" "$OUT/paper_earlier.log" 2>/dev/null
phase inference "${limits[3]}" $PY benchmarks/inference.py "${config[@]}" --images=$images \
  --config.refine.superpixels=device \
  --json="$OUT/inference.json"
echo "=== done after $(( $(date +%s) - start )) s; figures in $OUT" | tee -a "$OUT/log.txt"
