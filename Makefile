# Two commands do all the setup on a fresh machine (see README):
#   make demo   export the default model, check it, validate it and time it
#   make test   lint, type-check and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SOURCES := setup.py pyproject.toml $(shell find custom_ops -name '*.cc' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name 'build.py')
OUT ?= out

# torch comes from PyTorch's CPU index: from PyPI alone, pip takes a multi-GB CUDA build. Set it
# empty where pip already finds a CPU torch (.ci/run does: its machines serve one from disk and
# have no network, where an unreachable index costs a minute of retries).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# onnxruntime-gpu on Linux x86_64 (it runs on the CPU too; the CUDA tests need it), else onnxruntime.
# Installed by name beside the extras: no extra names an onnxruntime (see setup.py).
ORT ?= $(if $(filter Linux/x86_64,$(shell uname -s)/$(shell uname -m)),gpu,cpu)
ORT_REQUIREMENT := $(if $(filter gpu,$(ORT)),onnxruntime-gpu,onnxruntime)>=1.20
DEMO_EXTRAS := export
TEST_EXTRAS := $(DEMO_EXTRAS),dev,plot,serve,hf,openvino
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install demo test lint clean properties mutate mutate-python mutate-kernel

install: $(TEST_STAMP)

# $(1): the extras. torch is installed first and alone, so only it comes from TORCH_INDEX; the
# build environment itself needs no torch.
define install
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) torch==2.13.0
	@echo "pip install -e '.[$(1)]': dependencies, then building $$($(BIN)/python \
	  custom_ops/build.py --describe --cuda $${FLASH_EXPORT_CUDA:-auto}); about 1 min, quiet" >&2
	FLASH_EXPORT_WERROR=1 $(BIN)/python -m pip install -q -e '.[$(1)]' '$(ORT_REQUIREMENT)'
endef

$(DEMO_STAMP): $(SOURCES)
	$(call install,$(DEMO_EXTRAS))
	touch $@

# A test install holds everything the demo needs.
$(TEST_STAMP): $(SOURCES)
	$(call install,$(TEST_EXTRAS))
	touch $@ $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	mkdir -p $(OUT)
	$(BIN)/flash-export onnx --chunk 64 $(OUT)/flash_attention.onnx
	$(BIN)/flash-export validate $(OUT)/flash_attention.onnx
	$(BIN)/flash-export torchscript --chunk 64 $(OUT)/flash_attention.pt
	$(BIN)/flash-export bench $(OUT)/flash_attention.onnx --seq 256,1024 --iters 10
	$(BIN)/flash-export doctor

# C++ style: .clang-format (Google, 100 columns), with a pinned clang-format from its PyPI wheel
# (each release formats a little differently; the wheel needs no system package).
CLANG_FORMAT := $(BIN)/clang-format
CXX_SOURCES := $(shell find custom_ops -name '*.cc' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

lint: $(TEST_STAMP) $(CLANG_FORMAT)
	$(BIN)/ruff check flash_export tests examples benchmarks custom_ops setup.py flash_attention.py
	$(BIN)/mypy
	$(CLANG_FORMAT) --dry-run --Werror $(CXX_SOURCES)

$(CLANG_FORMAT): | $(TEST_STAMP)
	$(BIN)/python -m pip install -q clang-format==18.1.8

# Two pytest workers, a test file each at a time (module fixtures are built once): on CI's two
# cores the suite's subprocess-, compile- and I/O-bound files overlap.
test: lint
	$(BIN)/python -m pytest -q -rs -n 2 --dist loadfile --durations=15

# Property tests with many more examples than CI's bounded, fixed set (tests/conftest.py's
# "thorough" Hypothesis profile); a failure found here becomes an explicit @example.
properties: $(TEST_STAMP)
	HYPOTHESIS_PROFILE=thorough $(BIN)/python -m pytest -q tests/test_properties_*.py \
	  tests/test_kernel_regimes.py

# Mutation testing, not in CI (README, Development): mutmut on the torch-free modules
# ([tool.mutmut] in pyproject.toml: which modules, which fast tests), then the kernel's scripted
# mutants (custom_ops/mutants.py: one build each). Each part fails below its bar: a module under
# 90%, or a kernel mutant that survives or no longer applies.
MUTMUT := $(BIN)/mutmut

$(MUTMUT): | $(TEST_STAMP)
	$(BIN)/python -m pip install -q mutmut==3.8.1

mutate: mutate-python mutate-kernel

mutate-python: $(TEST_STAMP) $(MUTMUT)
	rm -rf mutants
	HYPOTHESIS_PROFILE=mutation $(MUTMUT) run > mutants.log 2>&1 || (tail -c 2000 mutants.log; exit 1)
	$(BIN)/python tests/_mutation_scores.py --survivors

mutate-kernel: $(TEST_STAMP)
	$(BIN)/python custom_ops/mutants.py

clean:
	rm -rf $(VENV) build flash_export/_native $(OUT) *.egg-info mutants mutants.log
