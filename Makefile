# Everything installs into .venv on first use: `make run` and `make test` need nothing else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: run test bench soak default-model clean

# The last step installs the console script .venv/bin/antiphon (editable: it runs this checkout);
# setuptools' notes about editable installs are for packagers, not users, so they are silenced.
$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=77"
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	PYTHONWARNINGS=ignore $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)     ## start the server with models/default (extra flags: make run ARGS="--mode generate")
	$(PY) -m server run $(ARGS)

test: $(STAMP)    ## the whole test suite
	$(PY) -m pytest -q

bench: $(STAMP)   ## latency and round-trip benchmark (writes bench.json)
	$(PY) -m server bench $(ARGS)

soak: $(STAMP)    ## long loopback run: latency percentiles over time and RSS (make soak ARGS="--seconds 600")
	$(PY) -m server soak $(ARGS)

default-model: $(STAMP)  ## retrain models/default from the seeded synthetic gestures
	$(PY) -m server synth --seed 1 --out datasets/synthetic.npz
	$(PY) -m server train --data datasets/synthetic.npz --size s --name default --seed 1

clean:
	rm -rf $(VENV) .pytest_cache
