# Set-up and the two things a user runs. Each target installs what it needs first.
#   make demo   - the demo job on a local Ray cluster, writing ./output
#   make test   - the test suite (what a change is checked with; under ~18 minutes on 2 cores)
#   make test-slow - the slow tier: tests of a minute or more each (CI runs both)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned through the rest of the install: with no torch
# present, pip resolves an unpinned torch to the newest CUDA build (gigabytes).
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-slow clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet --constraint $(VENV)/constraints.txt -e ".[dev]"
	touch $@

demo: install
	$(BIN)/imagegen run jobs/demo.yaml

# --durations: the suite must stay under ~18 min on 2 cores; the slowest tests are where to look.
test: install
	$(BIN)/pytest -m "not slow" --durations=20

test-slow: install
	$(BIN)/pytest -m slow

clean:
	rm -rf $(VENV) output .pytest_cache
