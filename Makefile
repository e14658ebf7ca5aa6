# Two commands do all the setup on a fresh machine (see README):
#   make demo   export the default model, check it, validate it and time it
#   make test   lint, type-check and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := setup.py pyproject.toml $(shell find custom_ops -name '*.cc' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name 'build.py')
OUT ?= out

.PHONY: install demo test lint clean

install: $(STAMP)

# torch is pinned and installed first: pip then takes the CPU wheel from this machine's disk
# instead of resolving a multi-GB CUDA build. The build environment itself needs no torch.
$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	FLASH_EXPORT_WERROR=1 $(BIN)/python -m pip install -q -e '.[dev,plot]'
	touch $(STAMP)

demo: $(STAMP)
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

lint: $(STAMP) $(CLANG_FORMAT)
	$(BIN)/ruff check flash_export tests examples benchmarks custom_ops setup.py flash_attention.py
	$(BIN)/mypy
	$(CLANG_FORMAT) --dry-run --Werror $(CXX_SOURCES)

$(CLANG_FORMAT): | $(STAMP)
	$(BIN)/python -m pip install -q clang-format==18.1.8

test: lint
	$(BIN)/python -m pytest -q -rs

clean:
	rm -rf $(VENV) build flash_export/_native $(OUT) *.egg-info
