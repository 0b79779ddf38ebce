# The two commands a new user types: `make run` and `make test`. Everything else is for developers.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint fmt bench clean mosquitto chromium wrk

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## Start the local stack (SQLite manager and demo agents) and watch the agents converge. Ctrl-C stops it.
run: $(STAMP)
	$(BIN)/policycast up

## Run the whole suite (SQLite, a throw-away PostgreSQL database, Mosquitto brokers and NATS clusters
## started by the tests, the console in Debian's Chromium), on two workers: most tests wait on brokers and processes, not on the CPU.
TEST_WORKERS ?= 2
test: $(STAMP) mosquitto chromium
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# The tests start their own Mosquitto 2 brokers (never the system one): install it if we can.
mosquitto:
	@if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing mosquitto (apt-get)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
		else \
			echo "error: Policycast's tests need Mosquitto 2 (the broker binary and its dynamic security plugin)."; \
			echo "       Install it, e.g. 'sudo apt-get install -y mosquitto', then run make test again."; \
			exit 1; \
		fi; \
	fi

# The console's tests drive Debian's Chromium through Playwright (Playwright's own browsers are never
# downloaded): install it if we can.
chromium:
	@if [ ! -x "$${POLICYCAST_TEST_CHROMIUM:-/usr/bin/chromium}" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing chromium (apt-get)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "error: the console's tests need Chromium at /usr/bin/chromium (Debian's package)."; \
			echo "       Install it, e.g. 'sudo apt-get install -y chromium', or set POLICYCAST_TEST_CHROMIUM,"; \
			echo "       then run make test again."; \
			exit 1; \
		fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy fabric_core manager_db api agent_stub broker_bridge local_stack

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP) mosquitto
	$(BIN)/python -m bench

# wrk, for `python -m bench.heartbeat_throughput --client wrk` (benchmark 2's other load client).
wrk:
	@if ! command -v wrk >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing wrk (apt-get)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; \
		else \
			echo "error: install wrk, e.g. 'sudo apt-get install -y wrk'"; exit 1; \
		fi; \
	fi

clean:
	rm -rf $(VENV) .policycast .pytest_cache .mypy_cache .ruff_cache
