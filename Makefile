# lstmserve: `make run` serves the demo model, `make test` runs the whole suite. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(shell find proto -name '*.proto')
GENERATED := $(PROTOS:.proto=_pb2.py)
MODEL ?= models/demo.pt

.PHONY: run test reliability proto lint bench bench-quick docker container container-test container-deps clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "grpcio-tools==1.85.1"
	$(MAKE) proto
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $@

proto: $(GENERATED)

proto/%_pb2.py: proto/%.proto
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $<

$(MODEL): | $(STAMP)
	$(VENV)/bin/lstmserve-export --demo --output $@

run: $(STAMP) $(GENERATED) $(MODEL)
	$(VENV)/bin/lstmserve --model-path $(MODEL)

# The state-store tests start a real redis-server, the monitoring tests a real Prometheus and its promtool
# (Debian's package `prometheus` has both); install them from Debian's packages when missing.
system-deps:
	@command -v redis-server >/dev/null && command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			redis-server prometheus; }

test: $(STAMP) $(GENERATED) system-deps
	$(PY) -m pytest

# The full reliability suite (load, faults, fuzz) with its summary table; `make test` runs a reduced one.
reliability: $(STAMP) $(GENERATED)
	LSTMSERVE_RELIABILITY=full $(PY) -m pytest tests/reliability -q

lint: $(STAMP)
	$(VENV)/bin/ruff check server client tests bench proto
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/shellcheck deploy/container/*.sh

# Benchmarks against the transport and compute limits (bench/, docs/benchmarks.md): ~15 min, or < 2 min quick.
bench: $(STAMP) $(GENERATED)
	$(PY) -m bench

bench-quick: $(STAMP) $(GENERATED)
	$(PY) -m bench --quick

docker:
	docker build -t lstmserve:latest .

# Without Docker (this machine): podman + runc, base image made locally; needs root. Not part of `make test`.
# container-deps installs podman, runc and debootstrap when missing, or refuses (not root, no apt-get) before
# anything is built.
container-deps:
	@deploy/container/system-deps.sh

container: container-deps
	deploy/container/build.sh localhost/lstmserve:latest

container-test: container-deps $(STAMP) $(GENERATED)
	deploy/container/test.sh localhost/lstmserve:latest

clean:
	rm -rf $(VENV) models $(GENERATED) $(GENERATED:_pb2.py=_pb2_grpc.py) $(GENERATED:.py=.pyi)
