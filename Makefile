# netadapt — one entry point for set-up, the main job, tests and benchmarks.
# Every target that needs Python creates .venv and installs the project first.

PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
PYTHON   := $(BIN)/python

.PHONY: run test lint typecheck protos bench-device clean help

help:
	@echo "make run           set up, start a daemon on loopback and run the main job"
	@echo "make test          set up, lint, type-check and run the test suite"
	@echo "make protos        regenerate the gRPC code from protos/"
	@echo "make bench-device  gRPC vs in-process timing of ~50 MobileNetV2 layers"

# torch first, pinned to the CPU wheel: an open range would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml setup.py
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[host,dev]"
	touch $(STAMP)

protos: $(STAMP)
	$(PYTHON) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. \
		protos/device.proto

run: $(STAMP) protos
	$(BIN)/netadapt-host demo

lint: $(STAMP) protos
	$(BIN)/ruff check .

typecheck: $(STAMP) protos
	$(BIN)/mypy device_server host lut

test: lint typecheck
	$(BIN)/python -m pytest -q

bench-device: $(STAMP) protos
	$(PYTHON) benchmarks/bench_device.py --out bench-results/device.json

clean:
	rm -rf $(VENV) build *.egg-info protos/*_pb2*.py protos/*_pb2*.pyi
