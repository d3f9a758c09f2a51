#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with what tools/gpu_check.sh needs on a GPU machine that reaches no registry:
# wheels of the test runner and its dependencies, for that machine's Python, and the golden file of the parity tests.
#
#   tools/fetch_gpu_wheels.sh [PACKAGE==VERSION ...]     (make gpu-wheels)
#
# The GPU image already holds PyTorch, numpy, pillow, scipy, tqdm, tensorboard, huggingface_hub and pytest;
# the default list is pytest and its pure-Python dependencies, a fallback should the image lack them. Name
# more packages to fetch them too; VAR_REFERENCE_IMPL=DIR (a work tree of FoundationVision/VAR) also copies that to
# .whl/reference_impl, so that the check times the reference on the same card (never torch: the machine's own build is the one tested). Each wheel is
# fetched without its dependencies (name those as well) for CPython $GPU_PYTHON (default 3.12) on
# manylinux x86-64. Then carry .whl to the GPU machine (it counts towards the 64 MiB that travel).
set -eu
cd "$(dirname "$0")/.."
PYVER=${GPU_PYTHON:-3.12}
PKGS=("$@")
[ ${#PKGS[@]} -gt 0 ] || PKGS=(pytest pluggy iniconfig packaging pygments)
for p in "${PKGS[@]}"; do
  case "$p" in torch|torch==*|torch\>*|torch\<*) echo "fetch_gpu_wheels.sh: not fetching torch: the GPU machine's own build is the one to test" >&2; exit 2 ;; esac
done
mkdir -p .whl/reference
python3 -m pip download --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${PKGS[@]}"
REF=${VAR_REFERENCE_DIR:-../shared/reference}
if [ -f "$REF/golden_small.pt" ]; then
  install -m 0644 "$REF/golden_small.pt" .whl/reference/golden_small.pt
else
  echo "fetch_gpu_wheels.sh: $REF/golden_small.pt not found: the CUDA parity tests will skip (set VAR_REFERENCE_DIR)" >&2
fi
if [ -n "${VAR_REFERENCE_IMPL:-}" ]; then   # the reference implementation, to time it on the card (never part of this project)
  [ -f "$VAR_REFERENCE_IMPL/models/__init__.py" ] || { echo "fetch_gpu_wheels.sh: VAR_REFERENCE_IMPL=$VAR_REFERENCE_IMPL has no models/__init__.py" >&2; exit 2; }
  rm -rf .whl/reference_impl && mkdir -p .whl/reference_impl
  cp -r "$VAR_REFERENCE_IMPL"/models "$VAR_REFERENCE_IMPL"/utils "$VAR_REFERENCE_IMPL"/*.py .whl/reference_impl/ 2>/dev/null
  find .whl/reference_impl -name '__pycache__' -prune -exec rm -rf {} +
fi
names=$(ls .whl/*.whl | sed 's#.*/##; s/-.*//' | sort)
dups=$(echo "$names" | uniq -d)
[ -z "$dups" ] || { echo "fetch_gpu_wheels.sh: several versions of: $dups in .whl/; keep one of each (pip refuses two)" >&2; exit 1; }
echo "fetch_gpu_wheels.sh: .whl/ holds $(du -sh .whl | cut -f1): $(echo $names | tr '\n' ' ')"
echo "carry it: run(command='tools/gpu_check.sh \$OUT', carry=['.whl'], timeout_s=540)"
