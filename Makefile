# Jumping VPN developer entry points. From a fresh clone: `make test`.
#   make venv   .venv with the project installed editable (+test, dev extras)
#   make deps   Debian packages the tests and the demo need (redis, nginx+njs, prometheus, compose, podman)
#   make demo   run the local demo         make bench   run the benchmark
#   make bench-cluster   cluster benchmark (gateways, nginx, node death, WAIT)
#   make base-image   a Debian base image made with debootstrap (no registry needed)
#   make test-containers   only the container test (tests/containers: build, compose up, kill)
#   make test   lint, then the test suite  make lint    ruff, import contracts, mypy
#   make dataplane   build the compiled data plane into .venv (needs cargo; else Python runs)
#   make loadgen   the datagram bench's compiled load generator and echo (instruments/loadgen)
#   make fuzz   the data plane's fuzz target for FUZZ_SECONDS (default 600; make test runs 10)
#   make dataplane-wheel   the data plane's wheel for the container image (dataplane/wheels/)
#   make test-long   the long runs (-m long: the randomized fault run of >= 10^4 decisions)
#   make clean  caches and build output    make distclean   also the .venv
# PYTHON=/path/to/python3.x picks the interpreter for a new .venv; ARGS=... is
# passed to `jvpn-lab demo` / `bench` / `bench-cluster`; PYTEST_ARGS=... to pytest.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PY_MIN := 3.11
PY_OK := import sys; sys.exit(sys.version_info < (3, 11))
VENV := .venv
BIN := $(VENV)/bin
# Re-install only when pyproject.toml is newer than this stamp.
STAMP := $(VENV)/.jvpn-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# Debian packages as command:package (or /absolute/file:package for what has no
# command, e.g. an nginx module); `deps` installs what is missing. perf counts the
# benches' system calls per packet (the raw_syscalls tracepoint). nginx + njs,
# Prometheus and docker-compose are for the cluster tests (tests/cluster); Podman
# with runc, its network stack (netavark, aardvark-dns: the service names) and
# debootstrap (the base image) for the container test (tests/containers). The
# install skips recommends, so each of them is named here.
NGINX_MODULES := /usr/lib/nginx/modules
PODMAN_LIBEXEC := /usr/lib/podman
DEB_DEPS := redis-server:redis-server nginx:nginx \
  $(NGINX_MODULES)/ngx_stream_module.so:libnginx-mod-stream \
  $(NGINX_MODULES)/ngx_stream_js_module.so:libnginx-mod-stream-js \
  prometheus:prometheus promtool:prometheus docker-compose:docker-compose \
  podman:podman runc:runc $(PODMAN_LIBEXEC)/netavark:netavark \
  $(PODMAN_LIBEXEC)/aardvark-dns:aardvark-dns debootstrap:debootstrap \
  nft:nftables iperf3:iperf3 wireguard-go:wireguard-go wg:wireguard-tools ping:iputils-ping \
  perf:linux-perf

PYTHON ?=
ARGS ?=
PYTEST_ARGS ?=
FUZZ_SECONDS ?= 600
# The compiled data plane (dataplane/: Rust, PyO3, built by maturin). Without cargo it is
# not built and everything runs on the Python data plane, which `make` says.
DATAPLANE_STAMP := $(VENV)/.jvpn-dataplane
DATAPLANE_SRC := dataplane/Cargo.toml dataplane/Cargo.lock dataplane/pyproject.toml $(wildcard dataplane/src/*.rs)
HAVE_CARGO := $(shell command -v cargo 2>/dev/null)
# The benches' load generator and echo: a lab instrument in its own crate, never in the
# data plane's module or the image.
LOADGEN := instruments/loadgen/target/release/jvpn-loadgen
LOADGEN_SRC := instruments/loadgen/Cargo.toml instruments/loadgen/Cargo.lock \
  $(wildcard instruments/loadgen/src/*.rs)

.PHONY: help venv deps demo test test-long lint bench bench-cluster base-image test-containers clean \
  distclean dataplane dataplane-test dataplane-wheel fuzz loadgen

help:
	@sed -n '2,15p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# \{0,1\}//'

venv: $(STAMP) dataplane loadgen

dataplane: $(STAMP)
ifeq ($(HAVE_CARGO),)
	@echo "note: no Rust toolchain (cargo): the compiled data plane is not built; the Python data plane runs"
else
	@$(MAKE) $(DATAPLANE_STAMP)
endif

$(DATAPLANE_STAMP): $(DATAPLANE_SRC) $(STAMP)
	@echo "building the compiled data plane (dataplane/, maturin --release) into $(VENV)"
	@VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/maturin develop --release -q -m dataplane/Cargo.toml
	@touch $@

loadgen:
ifeq ($(HAVE_CARGO),)
	@echo "note: no Rust toolchain (cargo): the benches' compiled load generator is not built"
else
	@$(MAKE) $(LOADGEN)
endif

$(LOADGEN): $(LOADGEN_SRC)
	@echo "building the benches' load generator and echo (instruments/loadgen, cargo --release)"
	@cargo build --release -q --manifest-path instruments/loadgen/Cargo.toml
	@touch $@

# The crate's own tests (unit, property, the shared vectors) and a bounded fuzz run.
dataplane-test:
ifeq ($(HAVE_CARGO),)
	@echo "note: no Rust toolchain (cargo): the crate's tests and the fuzz run are skipped"
else
	@echo "cargo test (dataplane)"; cd dataplane && cargo test --release -q
	@echo "cargo clippy (instruments/loadgen)"; \
	  cargo clippy --release -q --manifest-path instruments/loadgen/Cargo.toml -- -D warnings
	@$(MAKE) fuzz FUZZ_SECONDS=10
endif

# The wheel the container image installs (Dockerfile): abi3, for any CPython >= 3.11 on
# glibc (the image's Debian base is the same as this machine's). Built before the image.
dataplane-wheel: venv
	@VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/maturin build --release -q -m dataplane/Cargo.toml -o dataplane/wheels
	@ls dataplane/wheels/*.whl

# cargo-fuzz needs the nightly toolchain; it is installed from crates.io when missing.
fuzz:
	@if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then \
	  echo "note: no nightly Rust toolchain: cargo-fuzz cannot run (cargo test still covers the parsers)"; exit 0; fi; \
	if ! cargo fuzz --version >/dev/null 2>&1; then \
	  echo "installing cargo-fuzz"; cargo install -q cargo-fuzz --locked; fi; \
	echo "fuzzing the data plane's parsers for $(FUZZ_SECONDS) s (dataplane/fuzz)"; \
	cd dataplane && cargo +nightly fuzz run packet -- -max_total_time=$(FUZZ_SECONDS) 2>&1 \
	  | grep -E "^Done|SUMMARY|panicked|ERROR" || true; \
	test "$${PIPESTATUS[0]}" -eq 0

$(BIN)/python:
	@py="$(PYTHON)"; \
	if [ -z "$$py" ]; then \
	  for c in python3 python3.13 python3.12 python3.11; do \
	    if command -v "$$c" >/dev/null 2>&1 && "$$c" -c '$(PY_OK)' 2>/dev/null; then py="$$c"; break; fi; \
	  done; \
	fi; \
	if [ -z "$$py" ] || ! "$$py" -c '$(PY_OK)' 2>/dev/null; then \
	  found=$$( { $${py:-python3} --version || echo "no python3"; } 2>&1 ); \
	  echo "error: Python >= $(PY_MIN) is required to create $(VENV) (found: $$found)." >&2; \
	  echo "       Install python$(PY_MIN) or newer, or run: make PYTHON=/path/to/python3.11 ..." >&2; \
	  exit 1; \
	fi; \
	echo "creating $(VENV) with $$("$$py" --version 2>&1)"; \
	if ! "$$py" -m venv --clear $(VENV); then \
	  echo "error: '$$py -m venv' failed; on Debian/Ubuntu install python3-venv" >&2; \
	  rm -rf $(VENV); exit 1; \
	fi

$(STAMP): pyproject.toml | $(BIN)/python
	@if ! $(BIN)/python -c '$(PY_OK)' 2>/dev/null; then \
	  echo "error: $(VENV) runs $$($(BIN)/python --version 2>&1), Python >= $(PY_MIN) is required;" \
	       "run 'make distclean venv'" >&2; \
	  exit 1; \
	fi
	@echo "installing jumping-vpn and its test/dev tools into $(VENV)"
	@$(PIP) install -e '.[test,dev]'
	@touch $@

deps:
	@missing=""; \
	for dep in $(DEB_DEPS); do \
	  cmd=$${dep%%:*}; pkg=$${dep#*:}; \
	  if [ "$${cmd:0:1}" = / ]; then \
	    [ -e "$$cmd" ] || missing="$$missing $$pkg"; \
	  elif ! command -v "$$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$$cmd" ] && [ ! -x "/usr/bin/$$cmd" ]; then \
	    case " $$missing " in *" $$pkg "*) ;; *) missing="$$missing $$pkg";; esac; \
	  fi; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "error: missing Debian packages:$$missing" >&2; \
	    echo "       install them with: sudo apt-get install -y$$missing" >&2; \
	    exit 1; \
	  fi; \
	fi

demo: deps venv
	@$(BIN)/jvpn-lab demo $(ARGS)

bench: deps venv
	@$(BIN)/jvpn-lab bench $(ARGS)

# Cluster figures (instruments/bench_cluster.py): reattach with 1-3 gateways, node death, nginx, WAIT.
bench-cluster: deps venv
	@$(BIN)/jvpn-lab bench-cluster $(ARGS)

# The debootstrap base (cached in /var/tmp/jvpn-containers, made once per machine),
# imported into Podman; prints its name, the Dockerfile's BASE_IMAGE (README.md,
# "Containers without a registry"). ENGINE=docker imports it into Docker instead.
ENGINE ?= podman
base-image: deps
	@CONTAINERS_CONF=$${CONTAINERS_CONF:-$(CURDIR)/deploy/containers/containers.conf} \
	  sh deploy/containers/debian-base.sh $(ENGINE)

test-containers: deps venv
	@if [ -n "$(HAVE_CARGO)" ]; then $(MAKE) dataplane-wheel; fi
	@$(BIN)/python -m pytest -q -s -m containers tests/containers $(PYTEST_ARGS)

lint: venv
	@echo "ruff"; $(BIN)/ruff check -q .
	@echo "import contracts"; \
	out=$$($(BIN)/lint-imports --no-logo --no-cache 2>&1) || { echo "$$out" >&2; exit 1; }
	@echo "mypy"; $(BIN)/mypy

# pytest exits 5 when it collects no tests: that is a failure too. The suite runs on the
# compiled data plane when it was built (a module that fails to import is then an error,
# not a skip), and the data-plane, integration and unit tests again on the Python one (in
# the whole run's order: tests/integration/test_status.py fails when run after tests/unit).
test: deps venv
	@$(MAKE) lint
	@$(MAKE) dataplane-test
	@if [ -n "$(HAVE_CARGO)" ]; then $(MAKE) dataplane-wheel; fi  # for the image tests/containers builds
	@rc=0; req=0; [ -f $(DATAPLANE_STAMP) ] && req=1; \
	JVPN_REQUIRE_COMPILED=$$req $(BIN)/python -m pytest -q $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; \
	[ $$rc -ne 0 ] && exit $$rc; \
	if [ $$req = 1 ] && [ -z "$(PYTEST_ARGS)" ]; then \
	  echo "again on the Python data plane: tests/dataplane tests/integration tests/unit"; \
	  JVPN_DATA_PLANE=python $(BIN)/python -m pytest -q tests/dataplane tests/integration tests/unit || rc=$$?; \
	fi; \
	exit $$rc

# Many minutes each (tests marked long; JVPN_HISTORY_LONG_S sets the fault run's length).
test-long: deps venv
	@$(BIN)/python -m pytest -q -m long $(PYTEST_ARGS)

clean:
	@# .jvpn holds `jvpn-lab cluster` state: stop a running local cluster before deleting it.
	@if [ -f .jvpn/cluster/cluster.json ] && [ -x $(BIN)/jvpn-lab ]; then $(BIN)/jvpn-lab cluster down || true; fi
	@rm -rf dataplane/target dataplane/fuzz/target instruments/loadgen/target build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis .import_linter_cache .jvpn
	@find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +

distclean: clean
	@rm -rf $(VENV)
