# Every target creates .venv (if missing) and installs the project into it first,
# so each is one command on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench docs lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	# panopticapi (tests/test_panoptic_quality.py): its only PyPI build pins numpy<2 but runs on numpy 2.
	$(PY) -m pip install --quiet --no-deps panopticapi-lite==0.2.0
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile  # a file's tests (and its module fixtures) on one worker

demo: $(STAMP)
	$(PY) -m fishnet_pl.demo

bench: $(STAMP)  # the backbone table, end to end (fishnet-pl fit / predict against plain PyTorch loops), multi-task step
	$(PY) -m bench.backbones
	$(PY) -m bench.fit --workers 2 --rounds 2 --steps 4
	$(PY) -m bench.predict --workers 2 --rounds 2 --steps 4
	$(PY) -m bench.multitask --rounds 2 --steps 1

docs: $(STAMP)  # the docs site into site/ (open site/index.html); a broken link or reference fails it
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache
