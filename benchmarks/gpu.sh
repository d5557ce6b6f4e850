#!/usr/bin/env bash
# GPU figures in one short run (docs/benchmarks.md §9): on ONE CUDA device, in under
# 8 minutes in all, run
#   1. the default job (python jobs/train.py, through benchmarks/default_job.py: wall
#      time, PSS of the process tree, test rsum);
#   2. the step benchmark (benchmarks/step.py);
#   3. the mining benchmark at COCO's shape (113,287 images x 566,435 captions x
#      1024-d, K = 2000 / 400) in fp32, tf32 and bf16 with fp32 rescoring, with the
#      overlap@K of the approximate modes against fp32;
# and merge everything into OUT_DIR/gpu_results.json (benchmarks/gpu_report.py).
#
#   benchmarks/gpu.sh OUT_DIR              # needs CUDA; stops at once (exit 2) without
#   benchmarks/gpu.sh OUT_DIR --tiny-cpu   # every piece at a tiny size on CPU (a check
#                                          # of the script itself, no figures)
#
# Each piece runs under `timeout` with its own budget, so the whole run cannot pass
# 8 minutes; a piece that fails or runs out of time is recorded as such in the JSON
# and the next piece still runs. Run it from the repository root with aoq importable
# (pip install -e . or PYTHONPATH=platform).
set -euo pipefail

usage() { echo "usage: benchmarks/gpu.sh OUT_DIR [--tiny-cpu]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
OUT=$1
TINY=0
if [[ $# -eq 2 ]]; then
  [[ $2 == --tiny-cpu ]] || usage
  TINY=1
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
PY=${PYTHON:-python}

# ------------------------------------------------------------------ preflight
# Fail fast and clearly before anything is generated or started.
if [[ -e $OUT && -n $(ls -A "$OUT" 2>/dev/null) ]]; then
  echo "error: $OUT exists and is not empty; give a new directory" >&2
  exit 2
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if ! "$PY" - "$TINY" "$OUT/preflight.json" <<'EOF'
import json, sys
import torch
tiny, target = sys.argv[1] == "1", sys.argv[2]
info = {"torch": torch.__version__, "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": torch.cuda.device_count() if torch.cuda.is_available() else 0}
if not tiny:
    if not info["cuda_available"]:
        print(f"error: benchmarks/gpu.sh needs one CUDA device, but torch {torch.__version__} "
              f"(CUDA build: {torch.version.cuda or 'none, a CPU-only wheel'}) sees none; "
              "use --tiny-cpu to check the script on CPU", file=sys.stderr)
        sys.exit(2)
    info["device"] = torch.cuda.get_device_name(0)
json.dump(info, open(target, "w"), indent=1)
print(f"[gpu.sh] torch {info['torch']}, " + (info.get("device") or "CPU (--tiny-cpu)"))
EOF
then
  exit 2
fi

: > "$OUT/pieces.tsv"
printf 'preflight\t0\t0\n' >> "$OUT/pieces.tsv"

# piece NAME BUDGET_SECONDS COMMAND...: run it under timeout, record exit code and time.
piece() {
  local name=$1 budget=$2; shift 2
  local start ms code=0
  echo "[gpu.sh] $name (at most ${budget}s): $*"
  start=$(date +%s%N)
  timeout --signal=TERM --kill-after=15 "$budget" "$@" > "$OUT/$name.log" 2>&1 || code=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  printf '%s\t%s\t%d.%03d\n' "$name" "$code" $((ms / 1000)) $((ms % 1000)) >> "$OUT/pieces.tsv"
  echo "[gpu.sh] $name: exit $code, log $OUT/$name.log"
}

CACHE="data.cache_dir=$OUT/cache"
if [[ $TINY == 1 ]]; then
  DATA=(data.scenes.n_train=240 data.scenes.n_dev=40 data.scenes.n_test=100
        data.scenes.feature_dim=32 data.scenes.n_regions=12 model.embed_dim=32
        model.word_dim=16 optim.batch_size=32 data.dev_max_images=40
        negatives.k_captions=100 negatives.k_images=40 negatives.sampling_range=50)
  JOB=("${DATA[@]}" optim.epochs=2 run.device=cpu)
  MINING=(--device cpu --n-images 300 --dim 32 --k 50 --k-images 20 --threads 2)
  STEP=(--profile-steps 5)  # the tiny split has fewer than the default 30 steps
  BUDGETS=(120 300 600 120)
else
  DATA=()
  # One GPU, so one DDP worker with the default's whole global batch (2 x 128
  # pairs); the mining pool stays on the CPUs.
  JOB=(run.device=cuda run.num_workers=1 optim.batch_size=256)
  MINING=(--device cuda --n-images 113287 --dim 1024 --k 2000 --k-images 400
          --block-rows 2048 --tile-cols 16384)
  STEP=()
  BUDGETS=(40 150 150 130)
fi

cd "$ROOT"
piece prepare "${BUDGETS[0]}" "$PY" jobs/prepare.py "$CACHE" ${DATA[@]+"${DATA[@]}"}
piece default_job "${BUDGETS[1]}" "$PY" benchmarks/default_job.py --out "$OUT/default_job" \
  "$CACHE" "${JOB[@]}"
piece step "${BUDGETS[2]}" "$PY" benchmarks/step.py --out "$OUT/step" \
  ${STEP[@]+"${STEP[@]}"} "$CACHE" ${DATA[@]+"${DATA[@]}"}
piece mining "${BUDGETS[3]}" "$PY" benchmarks/mining.py "${MINING[@]}" \
  --captions-per-image 5 --precisions fp32 tf32 bf16 --repeats 1 --skip-faiss \
  --skip-naive --skip-single --author-subset 0 --json "$OUT/mining.json"

"$PY" benchmarks/gpu_report.py "$OUT"
