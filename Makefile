# make test: set up .venv (once), then run tests/ and verification/.  make demo: set up, then the main job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test verify mutations demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[train,dev]' 2> $(VENV)/pip.log \
		|| { cat $(VENV)/pip.log; exit 1; }
	$(PY) -c "import crate, reference, torch, hypothesis, sympy"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests verification

verify: setup
	$(PY) -m pytest -q verification

mutations: setup
	$(PY) -m verification.mutations

demo: setup
	$(PY) -m crate.demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
