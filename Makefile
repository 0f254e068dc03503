# Two commands do all the set-up: `make demo` and `make test`.
# The virtual environment is made once; the stamp file makes re-runs take seconds.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.posttrain-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/posttrain demo

test: $(STAMP)
	$(PY) -m pytest

# posttrain against TRL on identical work (issue 8): one table of ratios, also written to benchmarks/RESULTS.md
bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	test -d benchmarks/.trl112/trl || $(PY) -m pip install -q --disable-pip-version-check --no-deps \
		--target benchmarks/.trl112 trl==1.12.0
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV) runs
