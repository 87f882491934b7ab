# Two commands do everything on a fresh machine: `make quickstart` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EXTRAS ?= local,openai,hf,report,dev
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: install quickstart test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q -e '.[$(EXTRAS)]'
	touch $@

quickstart: install
	$(VENV)/bin/prefsynth run examples/quickstart.yaml
	$(VENV)/bin/prefsynth status examples/quickstart.yaml
	$(VENV)/bin/prefsynth report out/quickstart
	$(PY) -c "import datasets; d = datasets.load_dataset('parquet', data_dir='out/quickstart/pairs'); print(d)"

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m 'not slow'

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/judge_parse.py

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
