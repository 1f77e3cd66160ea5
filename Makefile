# Set-up and the two main jobs. Every target creates the virtual environment first if needed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export ECG_DATA_DIR ?= $(if $(wildcard ../shared/data/mitdb/RECORDS),$(abspath ../shared/data/mitdb),)
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: venv loso test bench ui clean

$(BIN)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

venv: $(BIN)/.installed

## The main job: the whole leave-one-subject-out experiment on the embedded store sqlite:///mlflow.db.
# P adds parameters, e.g. make loso P="-P records=100,101,200 -P epochs=1".
loso: venv
	PATH="$(abspath $(BIN)):$$PATH" mlflow run . -e loso --env-manager local --experiment-name ecg-loso $(P)

## The test suite (the same command CI runs).
test: venv
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest -q tests

bench: venv
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

## The MLflow UI on http://127.0.0.1:5000 over the embedded store.
ui: venv
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) mlruns mlartifacts mlflow.db .pytest_cache
