# swarmnet — two commands on a fresh machine: `make testnet`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOXIPROXY_VERSION := v2.12.0
TOXIPROXY := bin/toxiproxy-server
STAMP := $(VENV)/.installed

.PHONY: all install toxiproxy testnet test bench bench-node bench-boot bench-throughput bench-sim chaos clean

all: install toxiproxy

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Toxiproxy from source with the machine's Go, into a project-local bin/.
# `go install .../cmd/server` names its binary `server`; give it a clear name.
$(TOXIPROXY):
	@mkdir -p bin/.gobin
	@if command -v go >/dev/null 2>&1; then \
		echo "installing Toxiproxy $(TOXIPROXY_VERSION) with go install"; \
		GOBIN=$(CURDIR)/bin/.gobin go install github.com/Shopify/toxiproxy/v2/cmd/server@$(TOXIPROXY_VERSION) && \
		mv bin/.gobin/server $(TOXIPROXY); \
	else \
		echo "no Go on this machine: Toxiproxy not installed; use --links direct (process faults only)"; \
	fi

toxiproxy: $(TOXIPROXY)

testnet: install toxiproxy
	$(VENV)/bin/swarmnet up

# Two workers: the suite is half simulation (one core each) and half real networks that
# mostly wait.  A file's tests stay on one worker, so a module's fixture (a simulated run, a
# network; the cluster tests' one session cluster, all in tests/test_cluster.py) is built once.
TEST_JOBS ?= 2
test: install toxiproxy
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile

bench: bench-node bench-boot bench-throughput bench-sim

bench-node: install
	$(VENV)/bin/swarmnet bench node

bench-boot: install toxiproxy
	$(VENV)/bin/swarmnet bench boot

bench-throughput: install toxiproxy
	$(VENV)/bin/swarmnet bench throughput

bench-sim: install
	$(VENV)/bin/swarmnet bench sim

chaos: install toxiproxy
	$(VENV)/bin/swarmnet sim nightly
	$(VENV)/bin/swarmnet chaos nightly
	# Every nemesis kind on the 300-node network, three seeds: no fault late or failed.
	$(VENV)/bin/swarmnet bench faults --seeds 3

clean:
	rm -rf $(VENV) bin runs *.egg-info
