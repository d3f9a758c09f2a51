#!/usr/bin/env bash
# The prepared GPU check: the `cuda` tests, then the speed figures, then one JSON summary; at most 7.5 minutes.
#
#   tools/gpu_check.sh OUT_DIR                 # on a GPU machine (make gpu-check OUT=...)
#   tools/gpu_check.sh OUT_DIR --device=cpu    # dry run on the CPU: tiny sizes, the CUDA tests skip
#
# Steps, each under `timeout` in a budget of its own (GPU_CHECK_TOTAL_S, default 450 s, for the whole check):
#   cuda_tests  tests/test_cuda_*.py, 8 processes where pytest-xdist is there             85 s
#   profile     tools/gpu_profile.py: kernels and GPU-time shares, eager and with the speed features   65 s
#   compare     bench.py compare --reference --device=cuda: the reference's rows against this code's variants, d16,
#               batch 32, 3 interleaved rounds of fresh processes, 1 timed step each           185 s
#   memory      tools/gpu_memory.py: the largest training batch per card, d16-d30, checkpointing on and off   50 s
#   export      tools/gpu_export.py: sample.py writing 5,000 PNGs + npz, projected to 50,000  55 s
# then the summary (the rest). Each measuring step also gets a budget of its own a little inside the step's, so it
# ends by itself and writes its JSON; the JSON is written as the figures come, so a step stopped by `timeout` still
# leaves them. TorchInductor's cache (TORCHINDUCTOR_CACHE_DIR) is one folder under the scratch folder for every step:
# the profile's compilation fills it, and the comparison's fresh processes compile from it.
#
# The reference implementation (FoundationVision/VAR) is a work tree in $VAR_REFERENCE_IMPL, or copied to
# .whl/reference_impl by tools/fetch_gpu_wheels.sh; without one the comparison is not run. It installs nothing from
# the network. The python is $PYTHON, else python3 (else .venv/bin/python when python3 has no torch). Packages missing
# there are installed, for this run only, from the wheels in .whl/ (tools/fetch_gpu_wheels.sh fills it; carry .whl to
# the GPU machine); .whl/reference/golden_small.pt, if there, is the golden file of the parity tests when
# ../shared/reference is absent.
# Writes to OUT_DIR (at most 8 files, what comes back from a GPU machine): summary.json (card, torch, CUDA, every step's
# status and time, the figures of each step, the environment), steps.log (each step's command and the tails of its
# output), pytest.log, junit.xml, profile.json, compare_reference.json, memory.json, export.json. The last line
# printed is the one-line summary, also when steps fail. Exit status: 0 when every step passed, 1 otherwise, 2 for a
# usage error.
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
  TOTAL=${GPU_CHECK_TOTAL_S:-450}      # the whole check: 7.5 minutes
  T_TESTS=85; T_PROFILE=65; T_COMPARE=185; T_MEMORY=50; T_EXPORT=55
  PROFILE_ARGS=(--device=cuda)
  COMPARE_ARGS=(--device=cuda --depth=16 --bs=32 --steps=1 --repeat=3)
  MEMORY_ARGS=(--device=cuda)
  EXPORT_ARGS=(--device=cuda)
else                                   # dry run: tiny sizes, a slow shared CPU (compiling on it takes minutes)
  TOTAL=${GPU_CHECK_TOTAL_S:-1800}
  T_TESTS=120; T_PROFILE=400; T_COMPARE=700; T_MEMORY=200; T_EXPORT=200
  PROFILE_ARGS=(--device=cpu --quick)
  COMPARE_ARGS=(--device=cpu --quick --repeat=1 --rows=cuda)   # the CUDA rows' code paths, on the CPU
  MEMORY_ARGS=(--device=cpu --quick --depths=2,3 --batches=2,4)
  EXPORT_ARGS=(--device=cpu --quick)
fi
RESERVE=10                             # kept for the summary

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

# budget_for BUDGET_S: the step's budget, cut to what the total leaves
budget_for() {
  local b=$1 left=$(( START + TOTAL - RESERVE - $(date +%s) ))
  [ "$b" -gt "$left" ] && b=$left
  echo "$b"
}
# inner BUDGET_S MARGIN_S: the measuring tool's own budget, inside the step's
inner() { local b=$(( $1 - $2 )); [ "$b" -lt 5 ] && b=5; echo "$b"; }

# tail_into_log NAME FILE LINES: the last lines of one of a step's outputs, into steps.log (kept small)
tail_into_log() {
  [ -s "$2" ] || return 0
  echo "---- $1: last $3 lines of $(basename "$2")" >> "$OUT/steps.log"
  tail -n "$3" "$2" | cut -c1-400 >> "$OUT/steps.log"
}

# step NAME BUDGET_S STDOUT_FILE CMD...: run CMD under timeout; stdout to STDOUT_FILE, both tails into steps.log
step() {
  local name=$1 budget=$2 outfile=$3; shift 3
  if [ "$budget" -lt 10 ]; then
    log "$name: not run (no time left in the ${TOTAL}s budget)"
    printf '%s\t%s\t%s\t%s\n' "$name" "not_run" 0 "$budget" >> "$WORK/steps.tsv"
    return
  fi
  log "$name: $* (budget ${budget}s)"
  echo "==== $name: $* (budget ${budget}s)" >> "$OUT/steps.log"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$budget" "$@" > "$outfile" 2> "$WORK/$name.err"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$budget" >> "$WORK/steps.tsv"
  log "$name: exit $rc after $(( $(date +%s) - t0 ))s"
  echo "==== $name: exit $rc after $(( $(date +%s) - t0 ))s" >> "$OUT/steps.log"
  [ "$outfile" = "$OUT/pytest.log" ] || tail_into_log "$name" "$outfile" 80
  tail_into_log "$name" "$WORK/$name.err" 60
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
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor_cache"   # one compile cache for every step and its fresh processes

{ date -u; uname -a; "$PY" --version; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|numpy|pillow|scipy|tqdm|tensorboard|huggingface|pytest|flash|xformers|triton)' ; } > "$WORK/env.txt" 2>&1

# ---------------------------------------------------------------- 1. the cuda tests
XDIST=()                               # the tests in 8 processes where pytest-xdist is there (one GPU is enough for them)
[ "$DEVICE" = cuda ] && "$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 8)
CUDA_TESTS=(tests/test_cuda_*.py)
step cuda_tests "$(budget_for $T_TESTS)" "$OUT/pytest.log" "$PY" -m pytest -m cuda -q -rs --tb=short -p no:cacheprovider "${XDIST[@]}" \
  --junitxml="$OUT/junit.xml" "${CUDA_TESTS[@]}"
if [ -f "$OUT/pytest.log" ] && [ "$(stat -c %s "$OUT/pytest.log")" -gt 4000000 ]; then   # keep it well inside what comes back
  tail -c 4000000 "$OUT/pytest.log" > "$WORK/pytest.tail" && mv "$WORK/pytest.tail" "$OUT/pytest.log"
fi

# ---------------------------------------------------------------- 2. where the GPU time goes
B=$(budget_for $T_PROFILE)
step profile "$B" "$WORK/profile.out" "$PY" tools/gpu_profile.py --out="$OUT" "${PROFILE_ARGS[@]}" --budget_s="$(inner "$B" 25)"

# ---------------------------------------------------------------- 3. the reference implementation on the same card
REF_IMPL=${VAR_REFERENCE_IMPL:-}
[ -z "$REF_IMPL" ] && [ -f .whl/reference_impl/models/__init__.py ] && REF_IMPL="$REPO/.whl/reference_impl"
if [ -n "$REF_IMPL" ]; then
  B=$(budget_for $T_COMPARE)
  step compare "$B" "$WORK/compare.out" "$PY" bench.py compare --reference="$REF_IMPL" "${COMPARE_ARGS[@]}" --out_dir="$OUT" \
    --budget_s="$(inner "$B" 10)"
else
  log "compare: not run (no reference work tree: set VAR_REFERENCE_IMPL, or VAR_REFERENCE_IMPL=DIR make gpu-wheels)"
fi

# ---------------------------------------------------------------- 4. memory: the largest batch per card
B=$(budget_for $T_MEMORY)
step memory "$B" "$WORK/memory.out" "$PY" tools/gpu_memory.py --out="$OUT" "${MEMORY_ARGS[@]}" --budget_s="$(inner "$B" 12)"

# ---------------------------------------------------------------- 5. an FID export: 5,000 PNGs + npz
B=$(budget_for $T_EXPORT)
step export "$B" "$WORK/export.out" "$PY" tools/gpu_export.py --out="$OUT" --work="$WORK/export" "${EXPORT_ARGS[@]}" \
  --budget_s="$(inner "$B" 12)"
rm -rf "$WORK/export"                  # the checkpoints and the sample set: gigabytes

# ---------------------------------------------------------------- 6. the summary
rm -f "$OUT"/*.tmp-*                   # a JSON whose writer was stopped mid-write leaves its temporary file
timeout -k 5 60 "$PY" tools/gpu_check_summary.py --work="$WORK" --out="$OUT" --device="$DEVICE" --seconds="$(( $(date +%s) - START ))"
rc=$?
if [ $rc -gt 1 ]; then   # the summariser itself broke: still say so in one line
  echo "GPU CHECK: BROKEN: tools/gpu_check_summary.py exited $rc; steps: $(cut -f1,2 "$WORK/steps.tsv" | tr '\t\n' '= ')"
  exit 1
fi
exit $rc
