#!/usr/bin/env bash
# The prepared GPU check: the `cuda` tests, then bench.py on CUDA, then one JSON summary; at most 8 minutes.
#
#   tools/gpu_check.sh OUT_DIR                 # on a GPU machine (make gpu-check OUT=...)
#   tools/gpu_check.sh OUT_DIR --device=cpu    # dry run on the CPU: small sizes, the CUDA tests skip
#
# With a work tree of the reference implementation (FoundationVision/VAR) in $VAR_REFERENCE_IMPL, or copied to
# .whl/reference_impl by tools/fetch_gpu_wheels.sh, it also times the reference against this code on the same card
# (bench.py compare --reference --device=cuda: d16, batch 32, bf16 and fp16 training steps, fp16 sampling, 3 rounds).
# It installs nothing from the network. The python is $PYTHON, else python3 (else .venv/bin/python when
# python3 has no torch). Packages missing there are installed, for this run only, from the wheels in .whl/
# (tools/fetch_gpu_wheels.sh fills it; carry .whl to the GPU machine); .whl/reference/golden_small.pt, if
# there, is the golden file of the parity tests when ../shared/reference is absent.
# Writes to OUT_DIR: summary.json (card, torch, CUDA, every step's status and time, images/s and peak memory
# of each measurement), pytest.log, junit.xml, steps.log (the steps' stderr), env.txt. Every step runs under `timeout` in a
# budget of its own and the whole stays under the total budget; the last line printed is the one-line summary,
# also when steps fail. Exit status: 0 when every step passed, 1 otherwise, 2 for a usage error.
set -u

usage() { echo "usage: tools/gpu_check.sh OUT_DIR [--device=cpu|cuda]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
DEVICE=cuda
for a in "$@"; do
  case "$a" in
    --device=cpu|--device=cuda) DEVICE=${a#--device=} ;;
    *) echo "gpu_check.sh: unknown argument '$a'" >&2; usage ;;
  esac
done
case "$OUT" in -*) echo "gpu_check.sh: OUT_DIR '$OUT' looks like a flag; give the output folder first" >&2; usage ;; esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create OUT_DIR '$OUT'" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$REPO" || exit 2

START=$(date +%s)
if [ "$DEVICE" = cuda ]; then
  TOTAL=${GPU_CHECK_TOTAL_S:-480}       # the whole check: 8 minutes
  T_TESTS=150; T_TRAIN=45; T_SAMPLE=40; T_REF=270   # the compare took 203 s on an H200 (18 fresh processes)
  TRAIN="--depth=16 --bs=32 --reso=256 --steps=5"
  SAMPLE="--depth=16 --bs=64 --steps=3"
  REF_SIZES="--depth=16 --bs=32 --steps=3 --repeat=3"
else                                   # dry run: small sizes, a slow shared CPU
  TOTAL=${GPU_CHECK_TOTAL_S:-1500}
  T_TESTS=120; T_TRAIN=300; T_SAMPLE=240; T_REF=300
  TRAIN="--depth=2 --bs=2 --reso=256 --steps=1"
  SAMPLE="--depth=2 --bs=2 --steps=1"
  REF_SIZES="--quick --repeat=1"
fi
RESERVE=15                             # kept for the summary

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

# step NAME BUDGET_S OUTFILE CMD...: run CMD under timeout, stdout to OUTFILE, stderr to steps.log
step() {
  local name=$1 budget=$2 outfile=$3; shift 3
  local left=$(( START + TOTAL - RESERVE - $(date +%s) ))
  [ "$budget" -gt "$left" ] && budget=$left
  if [ "$budget" -lt 10 ]; then
    log "$name: not run (no time left in the ${TOTAL}s budget)"
    printf '%s\t%s\t%s\t%s\n' "$name" "not_run" 0 "$budget" >> "$WORK/steps.tsv"
    return
  fi
  log "$name: $* (budget ${budget}s)"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$budget" "$@" > "$outfile" 2>> "$OUT/steps.log"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$budget" >> "$WORK/steps.tsv"
  log "$name: exit $rc after $(( $(date +%s) - t0 ))s"
}

# ---------------------------------------------------------------- python, packages, reference data
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch' 2>/dev/null && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
fi
: > "$OUT/steps.log"
: > "$WORK/steps.tsv"
log "python: $PY; device: $DEVICE; output: $OUT"
NEEDED="torch numpy PIL scipy tqdm tensorboard huggingface_hub pytest"
missing() { "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}
MISSING=$(missing $NEEDED 2>/dev/null || echo "$NEEDED")
if [ -n "$MISSING" ]; then
  if ls .whl/*.whl > /dev/null 2>&1; then
    log "missing: $MISSING; installing the wheels of .whl/ into $WORK/site (this run only)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl >> "$OUT/steps.log" 2>&1 \
      || log "installing .whl/ failed (see steps.log)"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    MISSING=$(missing $NEEDED 2>/dev/null || echo "$NEEDED")
  fi
  [ -n "$MISSING" ] && log "still missing: $MISSING (run tools/fetch_gpu_wheels.sh here and carry .whl)"
fi
echo "$MISSING" > "$WORK/missing.txt"
if [ -z "${VAR_REFERENCE_DIR:-}" ] && [ ! -f ../shared/reference/golden_small.pt ] && [ -f .whl/reference/golden_small.pt ]; then
  export VAR_REFERENCE_DIR="$REPO/.whl/reference"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

{ date -u; uname -a; "$PY" --version; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|numpy|pillow|scipy|tqdm|tensorboard|huggingface|pytest|flash|xformers|triton)' ; } > "$OUT/env.txt" 2>&1

# ---------------------------------------------------------------- 1. the cuda tests
XDIST=()                               # the tests in 8 processes where pytest-xdist is there (one GPU is enough for them)
[ "$DEVICE" = cuda ] && "$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 8)
step cuda_tests "$T_TESTS" "$OUT/pytest.log" "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider "${XDIST[@]}" --junitxml="$OUT/junit.xml" \
  tests/test_cuda_golden.py tests/test_cuda_attention.py tests/test_cuda_amp.py tests/test_cuda_scripts.py

# ---------------------------------------------------------------- 2. bench.py: training steps, sampling
for dt in bf16 fp16 fp32; do   # TF32 on, as train.py runs by default (the tokenizer's float32 convolutions too)
  step "train_${dt}_tf32" "$T_TRAIN" "$WORK/train_${dt}_tf32.json" "$PY" bench.py train $TRAIN --dtype=$dt --tf32 --device=$DEVICE --json
done
step sample_fp32_tf32 "$T_SAMPLE" "$WORK/sample_fp32_tf32.json" "$PY" bench.py sample $SAMPLE --dtype=fp32 --tf32 --device=$DEVICE --json
step sample_bf16 "$T_SAMPLE" "$WORK/sample_bf16.json" "$PY" bench.py sample $SAMPLE --dtype=bf16 --device=$DEVICE --json

# ---------------------------------------------------------------- 3. the reference implementation on the same card
REF_IMPL=${VAR_REFERENCE_IMPL:-}
[ -z "$REF_IMPL" ] && [ -f .whl/reference_impl/models/__init__.py ] && REF_IMPL="$REPO/.whl/reference_impl"
if [ -n "$REF_IMPL" ]; then
  step reference_compare "$T_REF" "$OUT/reference_compare.txt" "$PY" bench.py compare --reference="$REF_IMPL" --device=$DEVICE $REF_SIZES --out_dir="$OUT"
else
  log "reference_compare: not run (no reference work tree: set VAR_REFERENCE_IMPL, or VAR_REFERENCE_IMPL=DIR make gpu-wheels)"
fi

# ---------------------------------------------------------------- 4. the summary
timeout -k 5 60 "$PY" tools/gpu_check_summary.py --work="$WORK" --out="$OUT" --device="$DEVICE" --seconds="$(( $(date +%s) - START ))"
rc=$?
if [ $rc -gt 1 ]; then   # the summariser itself broke: still say so in one line
  echo "GPU CHECK: BROKEN: tools/gpu_check_summary.py exited $rc; steps: $(cut -f1,2 "$WORK/steps.tsv" | tr '\t\n' '= ')"
  exit 1
fi
exit $rc
