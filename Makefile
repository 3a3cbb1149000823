# BitMesh entry points. Everything runs from a venv in .venv; `make deps` installs it all.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST ?= $(PY) -m pytest

.PHONY: deps test bench demo lint ipk clean

deps:
	./tools/deps.sh

test: deps
	$(PYTEST) -q

bench: deps
	$(PY) -m bench.run

# ipk: dist/bitmesh, luci-app-bitmesh and python3-bitcoinlib .ipk files, reproducible, no OpenWrt SDK
ipk: deps
	$(PY) tools/ipk.py --out dist

# demo: the whole hotspot in network namespaces (root): capture, pay, browse, cut-off, settlement
demo: deps
	$(PY) -m tools.demo

lint: deps
	$(PY) -m ruff check bitmesh tests bench tools

clean:
	rm -rf dist build test-output .pytest_cache
