# netadapt — one entry point for set-up, the main job, tests and benchmarks.
# Every target that needs Python creates .venv and installs the project first.

PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
PYTHON   := $(BIN)/python

.PHONY: run test lint typecheck protos bench-device bench-lut bench-adapt bench-adapt-quick bench-scale bench-models bench-run bench-protocol \
	bench-reliability \
	clean help

help:
	@echo "make run           set up, start a daemon on loopback, adapt MobileNetV1 on MNIST"
	@echo "make test          set up, lint, type-check and run the test suite"
	@echo "make protos        regenerate the gRPC code from protos/"
	@echo "make bench-device  gRPC vs in-process timing of ~50 MobileNetV2 layers"
	@echo "make bench-lut     full-table build time and estimate-vs-measured error"
	@echo "make bench-adapt   NetAdapt vs MACs-driven vs uniform width at three budgets"
	@echo "make bench-scale   one iteration on sequential / local pool / Ray; 1 vs 2 pinned daemons"
	@echo "make bench-protocol which statistic of a measurement repeats, quiet and noisy"
	@echo "make bench-models  12 torchvision models at 224x224: analysis, lut validate, 2-iteration adapt"
	@echo "make bench-run     make run's job 3x quiet and 3x beside a noisy neighbour: budget kept?"
	@echo "make bench-reliability bad inputs, hostile models, killed clients/workers, lost device, full disk"
	@echo "make deploy-device DEVICE=ssh://USER@HOST[:PORT] | DEVICE=adb[:SERIAL]"
	@echo "                   install or update the daemon on a device and start it"
	@echo "make device-status DEVICE=...   is it running and serving for this host?"
	@echo "make device-stop   DEVICE=...   stop it"
	@echo "make device-wheels PLATFORM=aarch64 [PYTHON_VERSION=3.11] [GLIBC=2.28] [WHEELS_DIR=d]"
	@echo "                   the daemon's wheels for a device without internet (--wheelhouse)"
	@echo "make test-arm      deploy to an aarch64 board (qemu-user) and measure there"

# torch first, pinned to the CPU wheel: an open range would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml setup.py
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[host,ray,dev]"
	touch $(STAMP)

# google/rpc/status.proto comes from googleapis-common-protos (installed with grpcio-status).
protos: $(STAMP)
	$(PYTHON) -m grpc_tools.protoc -I . \
		-I "$$($(PYTHON) -c 'import google.rpc, os; print(os.path.dirname(os.path.dirname(list(google.rpc.__path__)[0])))')" \
		--python_out=. --grpc_python_out=. --pyi_out=. protos/device.proto

# The main job, 10-20 minutes on 2 cores (a proposal worker each): MobileNetV1 (width 0.5) on the
# built-in 5,000 MNIST digits, half the measured latency, on a daemon started on loopback.
run: $(STAMP) protos
	$(BIN)/netadapt-host adapt --model mobilenet_v1 --model-arg width_mult=0.5 --data mnist_5k \
		--budget 0.5 --base-epochs 3 --initial-reduction 0.05 --short-term-steps 10 \
		--long-term-epochs 5 --workers 2 --workdir runs/mobilenet_v1-mnist --overwrite

# ruff, and import-linter's contracts in pyproject.toml (imports flow one way).
lint: $(STAMP) protos
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: $(STAMP) protos
	$(BIN)/mypy device_server host lut

test: lint typecheck test-deps
	$(BIN)/python -m pytest -q

# The deploy tests' second hosts (sshd in a network namespace, an aarch64 board under
# qemu-user) need system packages: installed as root where apt-get is, else one line says why
# those tests will be skipped.
.PHONY: test-deps test-arm
test-deps:
	@tests/system_deps.sh

# Only the aarch64 board: build (once) or reuse the arm64 userland, deploy, measure, stop.
test-arm: $(STAMP) protos test-deps
	$(BIN)/python -m pytest -q tests/test_deploy_arm.py

bench-device: $(STAMP) protos
	$(PYTHON) benchmarks/bench_device.py --out bench-results/device.json

bench-lut: $(STAMP) protos
	$(PYTHON) benchmarks/bench_lut.py --out bench-results/lut.json

bench-adapt: $(STAMP) protos
	$(PYTHON) benchmarks/bench_adapt.py --out bench-results/adapt.json

# One seed, the 50% budget: latency vs MACs vs Torch-Pruning on both tasks.
bench-adapt-quick: $(STAMP) protos
	$(PYTHON) benchmarks/bench_adapt.py --quick --out bench-results/adapt-quick.json

bench-scale: $(STAMP) protos
	$(PYTHON) benchmarks/bench_scale.py --out bench-results/scale.json

# torchvision's classification models (random weights) at 1x3x224x224: groups found, LUT error
# over 8 variants, a 2-iteration adapt on 64 upsampled digits (~1 h on 2 shared cores).
bench-models: $(STAMP) protos
	$(PYTHON) benchmarks/bench_models.py --out bench-results/models.json

# Which statistic repeats (min / p10 / p25 / median / trimmed mean), quiet and beside a noisy
# neighbour, and whether a new session changes it (~5 min).
bench-protocol: $(STAMP) protos
	$(PYTHON) benchmarks/bench_protocol.py --out bench-results/protocol.json

# `make run` three times quiet and three times beside a noisy neighbour, interleaved (1-2 hours).
bench-run: $(STAMP) protos
	$(PYTHON) benchmarks/bench_run.py --runs 3 --out bench-results/run.json

# Failures on purpose (~5 min): bad inputs by RPC, hostile model files, clients killed
# mid-measurement, workers killed mid-run, a lost device, a full disk (a tmpfs: needs root).
bench-reliability: $(STAMP) protos
	$(PYTHON) benchmarks/bench_reliability.py --out bench-results/reliability.json

# The daemon on a phone or board (host/deploy): over ssh, or over adb to Termux's sshd. More
# options (--bind, --port, --threads, --wheelhouse, -i KEY) go in DEPLOY_ARGS.
DEVICE      ?=
DEPLOY_ARGS ?=
NEED_DEVICE  = @test -n "$(DEVICE)" || { echo "usage: make $@ DEVICE=ssh://USER@HOST[:PORT] \
	(Termux: port 8022) or DEVICE=adb[:SERIAL] [DEPLOY_ARGS='...']" >&2; exit 2; }

deploy-device: $(STAMP) protos
	$(NEED_DEVICE)
	$(BIN)/netadapt-deploy deploy --device '$(DEVICE)' $(DEPLOY_ARGS)

device-status: $(STAMP) protos
	$(NEED_DEVICE)
	$(BIN)/netadapt-deploy status --device '$(DEVICE)' $(DEPLOY_ARGS)

device-stop: $(STAMP) protos
	$(NEED_DEVICE)
	$(BIN)/netadapt-deploy stop --device '$(DEVICE)' $(DEPLOY_ARGS)

# The daemon's Python packages as wheels for a device without internet, downloaded here for the
# device's machine (uname -m), Python and glibc; then DEPLOY_ARGS="--wheelhouse DIR".
.PHONY: device-wheels
PLATFORM       ?=
PYTHON_VERSION ?= 3.11
GLIBC          ?= 2.28
WHEELS_DIR     ?=
device-wheels: $(STAMP)
	@test -n "$(PLATFORM)" || { echo "usage: make $@ PLATFORM=aarch64|x86_64 \
	[PYTHON_VERSION=3.11] [GLIBC=2.28] [WHEELS_DIR=DIR]" >&2; exit 2; }
	$(BIN)/netadapt-deploy wheels --platform '$(PLATFORM)' --python-version '$(PYTHON_VERSION)' \
		--glibc '$(GLIBC)' $(if $(WHEELS_DIR),--out '$(WHEELS_DIR)')

clean:
	rm -rf $(VENV) build *.egg-info protos/*_pb2*.py protos/*_pb2*.pyi
