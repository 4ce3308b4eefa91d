# make test: set up .venv (once), then run tests/ and verification/.  make demo: set up, then the main job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data test verify mutations demo demo-mae bench bench-compare lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[train,dev]' 2> $(VENV)/pip.log \
		|| { cat $(VENV)/pip.log; exit 1; }
	$(PY) -c "import crate, reference, torch, hypothesis, sympy"
	touch $(STAMP)

# Fashion-MNIST from the Debian package, where apt and root are available; elsewhere the data tests
# fail with a message saying how to get it (or set CRATE_FASHION_MNIST to a folder with the IDX files).
data:
	@if [ -z "$$CRATE_FASHION_MNIST" ] && [ ! -e $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] \
		&& [ ! -e $(FASHION_MNIST)/train-images-idx3-ubyte ]; then \
		if command -v apt-get > /dev/null && [ "$$(id -u)" = 0 ]; then \
			echo "installing dataset-fashion-mnist"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist > /dev/null; \
		else \
			echo "Fashion-MNIST missing: install the Debian package dataset-fashion-mnist or set CRATE_FASHION_MNIST"; \
		fi; \
	fi

test: setup data
	$(PY) -m pytest -q tests verification benchmarks --bench-smoke --benchmark-disable

verify: setup
	$(PY) -m pytest -q verification

mutations: setup
	$(PY) -m verification.mutations

# full CPU benchmarks (a few minutes); the JSON and its table go to benchmarks/results/, and the run,
# with its machine and commit, to pytest-benchmark's storage in benchmarks/history/ (commit both)
BENCH_STORAGE := --benchmark-autosave --benchmark-storage=file://benchmarks/history
bench: setup
	$(PY) -m pytest -q benchmarks $(BENCH_STORAGE) --benchmark-json=benchmarks/results/cpu-$$(date +%F).json
	$(PY) -m benchmarks.report benchmarks/results/cpu-$$(date +%F).json | tee benchmarks/results/cpu-$$(date +%F).md

# the newest run of this machine kind against its history: exit 1 on a regressed ratio; draws the history
bench-compare: setup
	$(PY) -m benchmarks.history --plot benchmarks/results/history.png

demo: setup data
	$(PY) -m crate.demo

# the CRATE-MAE demo: pre-training, reconstructions, encoder/decoder audit, probe and fine-tune (minutes)
demo-mae: setup data
	$(PY) -m crate.mae_demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
