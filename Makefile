# Everything installs into .venv on first use: `make run` and `make test` need nothing else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=
SHARED ?= ../shared
JOBS   ?= 3  # test processes (pytest-xdist; three on 2 cores fill the time tests spend waiting on sockets and children: 4 min 37 s against 5 min 24 s with two); a test file stays in one

.PHONY: run test mutants bench bench-corpus soak portability pd-screenshot default-model touch-model chorale-model models corpus corpus-train clean

# The last step installs the console script .venv/bin/antiphon (editable: it runs this checkout);
# setuptools' notes about editable installs are for packagers, not users, so they are silenced.
$(STAMP): requirements.txt requirements-test.txt requirements-corpus.txt pyproject.toml
	@echo "antiphon: installing TensorFlow, LiteRT, python-osc, mido and the test tools into $(VENV)"
	@echo "antiphon: once only, about 2 minutes and 2.6 GB; later runs start at once"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=77"
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	PYTHONWARNINGS=ignore $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)     ## start the server with models/default (extra flags: make run ARGS="--mode generate")
	$(PY) -m server run $(ARGS)

test: $(STAMP)    ## the whole test suite, in $(JOBS) processes (make test JOBS=1: one)
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile

mutants: $(STAMP) ## mutation testing of the live path with the fast tests: killed / total (make mutants ARGS=--again)
	$(PY) -m server.tools.mutants run $(ARGS)

bench: $(STAMP)   ## latency and round-trip benchmark (writes bench.json)
	$(PY) -m server bench $(ARGS)

bench-corpus: $(STAMP)  ## does train's memory stay flat: peak RSS on a corpus and on 10 copies of it (ARGS="--data DIR")
	$(PY) -m server.tools.bench_corpus $(ARGS)

soak: $(STAMP)    ## long loopback run: latency percentiles over time and RSS (make soak ARGS="--seconds 600")
	$(PY) -m server soak $(ARGS)

portability: $(STAMP)  ## does every stage dependency have a binary wheel on each platform x Python 3.11-3.13 (needs the registry)
	$(PY) -m server.tools.portability $(ARGS)

pd-screenshot: $(STAMP)  ## redraw patches/pd/antiphon.png: the Pd patch in Pd's GUI on a 1366x768 Xvfb screen (apt xvfb puredata-gui)
	$(PY) -m tests.pdgui patches/pd/antiphon.png

# The shipped models live in the repository's models/ (your own go to the per-user folder): --models-dir models
default-model: $(STAMP)  ## retrain models/default from the seeded synthetic gestures (under 3 minutes)
	$(PY) -m server synth --seed 1 --out datasets/synthetic.npz
	$(PY) -m server train --data datasets/synthetic.npz --size s --name default --models-dir models --seed 1 --minutes 2.5

touch-model: $(STAMP)  ## retrain models/touch from the touch-screen improvisations in ../shared/data (12 minutes)
	$(PY) -m server train --data $(SHARED)/data/touch-performances.npz --name touch --models-dir models --minutes 12 \
		--data-source "IMPSY touch-screen improvisations (github.com/cpmpercussion/impsy, datasets/training-dataset-4d.npz, first 36 performances)" \
		--data-licence "MIT licence: $$(cat $(SHARED)/data/LICENSE-touch-performances.txt)"
	cp $(SHARED)/data/LICENSE-touch-performances.txt models/touch/LICENSE-data.txt

chorale-model: $(STAMP)  ## retrain models/chorale from the Bach chorales in ../shared/data (10 minutes)
	$(PY) -m server dataset --midi $(SHARED)/data/bach-chorales --out datasets/chorales.npz
	$(PY) -m server train --data datasets/chorales.npz --name chorale --models-dir models --seed 1 --minutes 10 \
		--data-source "407 Bach chorales as MIDI, written from the music21 corpus" \
		--data-licence "public domain (music21: BSD)"

models: default-model touch-model chorale-model  ## all three shipped models

# A corpus at scale, in data/ (git-ignored): music21's freely licensed scores as MIDI, then shards (docs/distributed.md)
CORPUS := data/corpus21
corpus: $(STAMP)  ## write data/corpus21: music21's Bach chorales and folk-tune books as MIDI, then sharded (16 minutes here)
	$(PY) -m pip install --quiet -r requirements-corpus.txt
	$(PY) -m server.tools.corpus build $(CORPUS)/midi --jobs 2
	$(PY) -m server dataset --midi $(CORPUS)/midi --jobs 2 --shard-events 200000 --out $(CORPUS)/shards

corpus-train: $(STAMP)  ## two local worker processes train the model corpus21 on it, for train's own budget (ARGS="--minutes 60")
	$(PY) -m server.tools.workers 2 -- $(PY) -m server train --data $(CORPUS)/shards --name corpus21 \
		--data-source "music21 10.5.1 corpus: Bach chorales, Ryan's Mammoth, O'Neill's 1850, Aird's Airs, miscFolk, Nottingham (make corpus)" \
		--data-licence "public domain music; encodings distributed with music21 by permission, no restriction stated ($(CORPUS)/midi/SOURCES.txt)" \
		$(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache mutants
