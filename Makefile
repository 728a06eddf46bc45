# pytest-flightvm: every target installs what it needs (idempotent) via `make host`.
VENV ?= .venv
PY := $(VENV)/bin/python
REGISTRY ?= 127.0.0.1:5000/flightvm/base

.PHONY: host venv registry-prune demo test unit integration faults lint type bench clean-venv

host:
	@./scripts/host-setup.sh

# Only the virtualenv: no root, no packages, no daemons (the fast tier and the linters
# need nothing more; libvirt-python builds against libvirt-dev, which `make host` installs).
venv:
	@./scripts/venv-setup.sh

# Restart the local registry now, dropping what test/bench/demo runs pushed (make host
# also does this whenever it has to start the registry).
registry-prune:
	@PRUNE_REGISTRY=1 ./scripts/host-setup.sh

demo: host
	@$(PY) scripts/demo.py --registry $(REGISTRY)

# The whole suite: unit + integration on two workers, then the faults tier on its own
# (its trials print one tally line at the end, which xdist's controller would not show).
test: host
	$(PY) -m pytest tests/unit tests/integration -p no:cacheprovider -n 2 -v -rs
	$(PY) -m pytest tests/faults -p no:cacheprovider -v -rs

unit: venv
	$(PY) -m pytest tests/unit -q -n 2 -p no:cacheprovider

integration: host
	$(PY) -m pytest tests/integration -n 2 -v -rs -p no:cacheprovider

faults: host
	$(PY) -m pytest tests/faults -v -rs -p no:cacheprovider

lint: venv
	$(VENV)/bin/ruff check pytest_flightvm tests examples bench scripts

type: venv
	$(VENV)/bin/mypy pytest_flightvm

bench: host
	@$(VENV)/bin/pip install -q -e '.[bench]' >/dev/null 2>&1 || echo "bench: matplotlib not installed; the chart will be skipped"
	$(PY) -m bench $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
