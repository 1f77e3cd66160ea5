# Set-up and the two main jobs. Every target creates the virtual environment first if needed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export ECG_DATA_DIR ?= $(if $(wildcard ../shared/data/mitdb/RECORDS),$(abspath ../shared/data/mitdb),)
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: venv loso test bench ui clean server system-deps

$(BIN)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

venv: $(BIN)/.installed

## The main job: the whole leave-one-subject-out experiment on the embedded store sqlite:///mlflow.db.
# P adds parameters, e.g. make loso P="-P records=100,101,200 -P epochs=1". It first checks that
# the tracking server answers: `mlflow run` would retry one that is down for about four minutes.
loso: venv
	$(BIN)/python -m ecg_mlflow.tracking
	PATH="$(abspath $(BIN)):$$PATH" mlflow run . -e loso --env-manager local --experiment-name ecg-loso $(P)

## The test suite (the same command CI runs). Test files run in parallel, one per core (at most
## 4): most of a test's time is single-threaded TensorFlow tracing and process start-up, so a
## 2-core machine runs the suite in about half the time. The 15 slowest tests are listed at the end.
test: venv
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations 15 tests

bench: venv
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

## The MLflow UI on http://127.0.0.1:5000 over the embedded store.
ui: venv
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port 5000

## A local tracking server (UI + REST API + proxied artifacts) on http://127.0.0.1:$(PORT);
## runs reach it with MLFLOW_TRACKING_URI=http://127.0.0.1:$(PORT). S adds options, e.g. S=--auth.
PORT ?= 5000
server: venv
	$(BIN)/python -m ecg_mlflow.server --port $(PORT) $(S)

## System packages the UI, PostgreSQL and compose tests need (Debian); installs only what is missing.
SYSTEM_DEPS := chromium postgresql docker-compose
system-deps:
	@missing=$$(for p in $(SYSTEM_DEPS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "system-deps: all present ($(SYSTEM_DEPS))"; \
	elif ! command -v apt-get >/dev/null; then echo "system-deps: no apt-get; install $$missing yourself (their tests skip)"; \
	elif [ "$$(id -u)" != 0 ]; then echo "system-deps: not root; run 'sudo make system-deps' to install $$missing (their tests skip)"; \
	else apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; fi

clean:
	rm -rf $(VENV) mlruns mlartifacts mlflow.db .pytest_cache
