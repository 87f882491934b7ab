# Two commands do everything on a fresh machine: `make quickstart` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Each target installs only what it runs; one stamp per extras set, so a quickstart install
# followed by `make test` still installs the rest (pip skips what is already there).
QUICKSTART_EXTRAS := local,hf,report
TEST_EXTRAS := local,openai,hf,report,curate,ray,dev
EXTRAS ?= $(TEST_EXTRAS)
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: install install-quickstart install-test quickstart test test-fast lint bench clean

install: $(VENV)/.installed-$(EXTRAS)
install-quickstart: $(VENV)/.installed-$(QUICKSTART_EXTRAS)
install-test: $(VENV)/.installed-$(TEST_EXTRAS)

$(VENV)/.installed-%: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q -e '.[$*]'
	touch $@

quickstart: install-quickstart
	$(VENV)/bin/prefsynth run examples/quickstart.yaml
	$(VENV)/bin/prefsynth status examples/quickstart.yaml
	$(VENV)/bin/prefsynth report out/quickstart
	$(PY) -c "import datasets; d = datasets.load_dataset('parquet', data_dir='out/quickstart/pairs'); print(d)"

test: install-test
	$(PY) -m pytest -q

test-fast: install-test
	$(PY) -m pytest -q -m 'not slow'

lint: install-test
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

bench: install-test
	$(PY) bench/judge_parse.py

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
