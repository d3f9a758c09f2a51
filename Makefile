# Two commands set everything up: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements.txt
	@touch $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q -m "not benchmark"

demo: $(STAMP)
	$(PYTHON) demo.py --out demo_output

clean:
	rm -rf local_output demo_output .pytest_cache

bench: $(STAMP)
	$(PYTHON) bench.py compare
