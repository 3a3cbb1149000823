# BitMesh entry points. Everything runs from a venv in .venv; `make deps` installs it all.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST ?= $(PY) -m pytest

.PHONY: deps test bench demo lint ipk apk clean

deps:
	./tools/deps.sh

# The whole suite with the library versions OpenWrt 24.10 ships (.venv), then the tests of what
# uses bottle and paho-mqtt again with their newest releases (.venv-latest).
LATEST_TESTS := tests/test_portal.py tests/test_channel_regtest.py tests/test_channel_bad_input.py \
	tests/test_channel_crash.py tests/test_browser.py tests/test_ubus_owrt.py \
	tests/test_market_offer.py tests/test_mqtt_netns.py tests/test_fleet.py tests/test_fleet_netns.py \
	tests/test_uplink_market.py

test: deps
	$(PYTEST) -q
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider $(LATEST_TESTS)

# bench: every section; `make bench BENCH="soak gate"` runs those only and keeps the other figures
bench: deps
	$(PY) -m bench.run $(BENCH)

# ipk: dist/bitmesh, luci-app-bitmesh and python3-bitcoinlib .ipk files, reproducible, no OpenWrt SDK
ipk: deps
	$(PY) tools/ipk.py --out dist

# apk: the same packages as OpenWrt 25.12 .apk files plus the index dist/packages.adb, reproducible,
# packed by apk-tools' own `apk mkpkg`/`mkndx` (built by tools/pkg-managers.sh, cached in .cache/)
apk: deps
	$(PY) tools/apk.py --out dist

# demo: the whole hotspot in network namespaces (root): capture, pay, browse, cut-off, settlement
demo: deps
	$(PY) -m tools.demo

lint: deps
	$(PY) -m ruff check bitmesh tests bench tools

clean:
	rm -rf dist build test-output .pytest_cache
