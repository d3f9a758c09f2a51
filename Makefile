# Two commands set everything up: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
TEST_WORKERS ?= 2   # pytest-xdist processes; the suite runs its scripts with one thread each

.PHONY: venv test demo bench clean gpu-check gpu-wheels

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements.txt
	@touch $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) -m "not benchmark"

demo: $(STAMP)
	$(PYTHON) demo.py --out demo_output

clean:
	rm -rf local_output demo_output .pytest_cache

# `make bench REFERENCE=DIR`: this code against the reference implementation (DIR: a work tree of FoundationVision/VAR,
# kept outside this project), side by side on this CPU; without REFERENCE, against its own --mode=baseline.
REFERENCE ?=
bench: $(STAMP)
	$(PYTHON) bench.py compare $(if $(REFERENCE),--reference=$(REFERENCE))

# The prepared GPU check (tools/gpu_check.sh): cuda tests, the profile, the comparison with the reference, the memory table
# and an FID export's timing on CUDA, then OUT/summary.json, in at most 7.5 minutes (GPU_CHECK_TOTAL_S=450).
# Needs no .venv (the GPU machine's python3 has PyTorch); `make gpu-check OUT=dir DEVICE=cpu` is the dry run.
OUT ?= local_output/gpu_check
DEVICE ?= cuda
gpu-check:
	tools/gpu_check.sh $(OUT) --device=$(DEVICE)

# Fills .whl/ (ignored; carry it to the GPU machine) with wheels for what its image may lack, and the golden file.
gpu-wheels:
	tools/fetch_gpu_wheels.sh
