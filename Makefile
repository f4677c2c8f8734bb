# swaserve: `make up` starts the embedded default, `make test` tests it.
# Every target that needs the venv depends on `setup`, so each works alone on a fresh clone.

VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.swaserve-setup
MODEL   ?= smollm2
PORT    ?= 8000
PYTEST_ARGS ?=

.PHONY: setup up test test-all lint bench clean chart k8s-setup

PROTO_STAMP := services/proto_gen/.stamp

setup: $(STAMP) $(PROTO_STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	@touch $(STAMP)

# gRPC stubs, regenerated whenever a .proto changes
$(PROTO_STAMP): $(STAMP) $(wildcard proto/*.proto) scripts/gen_proto.sh
	PY=$(PY) bash scripts/gen_proto.sh
	@touch $(PROTO_STAMP)

up: setup
	$(VENV)/bin/swaserve up --model $(MODEL) --port $(PORT)

test: setup
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test-all: setup
	$(VENV)/bin/pytest -q -m '' $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy services swaserve bench/replay bench/sim bench/compare bench/compare_routers.py bench/word_tokens.py

# a real Kubernetes control plane for tests/k8s (the fixture runs this too): binaries, etcd, client
k8s-setup: setup
	bash scripts/k8s_setup.sh

# the chart: schema and values reference regenerated-equal, lint (strict), render + schema + golden checks
chart: setup
	$(PY) -m swaserve.chart_values --check
	$(VENV)/bin/pytest -q tests/deploy/chart -m 'not k8s'

bench: setup
	$(PY) bench/engine.py --quick

# the container image (Containerfile) without a daemon: mmdebstrap base, buildah build, podman smoke run,
# docker-archive tarball; VARIANT=cpu|cuda (docs/deploy-image.md)
.PHONY: image
VARIANT ?= cpu
image: setup
	VARIANT=$(VARIANT) bash scripts/image/build.sh

# the image's tests (marker `image`: build + podman runs; not in `make test`)
.PHONY: test-image
test-image: setup
	$(VENV)/bin/pytest -q -m image tests/deploy/image $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# the Grafana JSON in helm/swaserve/dashboards from swaserve/observability/panels.py (docs/observability.md)
.PHONY: dashboards
dashboards: setup
	$(VENV)/bin/swaserve dashboards generate

# the fault suite (marker `faults`: kill -9 of each service under load on a real local fleet; not in `make test`)
.PHONY: faults
faults: setup
	$(VENV)/bin/pytest -q -m faults tests/faults $(PYTEST_ARGS)
