# electra_fast: one command to set up, one to test. Override TORCH_SPEC to bring your own torch, e.g.
#   make setup TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup pretrain demo test aot bench clean

# torch is installed first and the package with --no-build-isolation, so pip never resolves torch
# itself (an unpinned torch pulls several GB of CUDA packages) and _C compiles against this torch.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel ninja
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# The main job: pretrain a tiny ELECTRA on the embedded corpus (a few minutes on a 2-core CPU), in a fresh
# run directory each time so nothing earlier is touched.
pretrain: setup
	$(PY) -m electra_fast info
	$(PY) -m electra_fast pretrain --out runs/pretrain-$$(date +%Y%m%d-%H%M%S)

demo: setup
	$(PY) -m electra_fast.info
	$(PY) -m electra_fast.demo

# ELECTRA_FAST_REQUIRE_EXT=1: a missing C++ extension fails the run instead of skipping the cpp lane.
# Then the quick benchmark as a smoke test (its results go to build/, never committed from CI).
test: setup
	ELECTRA_FAST_REQUIRE_EXT=1 $(PY) -m pytest tests -q $(PYTEST_ARGS)
	$(PY) -m electra_fast bench --quick --out build/bench-smoke

aot: setup
	$(PY) -m electra_fast.kernels.check

bench: setup
	$(PY) -m electra_fast bench

clean:
	rm -rf build *.egg-info electra_fast/_C*.so
