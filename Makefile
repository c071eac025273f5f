# The front-door commands. Each builds .venv from nothing when it is missing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Two pytest workers: most test time is XLA compilation, which is single-threaded. Work
# stealing keeps both busy to the end (a few tests take tens of seconds); the 15 slowest
# tests are printed so that the time budget stays visible (README, "Tests").
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal -q --durations=15

.PHONY: test test-all demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The newcomer's suite: every property, at the cheapest shapes and counts (under 8 minutes of
# tests on 2 cores).
test: $(STAMP)
	$(PYTEST) -m "not slow"

# Everything: the fast set plus the tests marked `slow` (sweeps, full fuzz counts, 8-device
# and multi-process runs). CI runs this.
test-all: $(STAMP)
	$(PYTEST)

# A fresh run each time (a kept workdir would resume at the last step and only re-evaluate).
demo: $(STAMP)
	rm -rf runs/demo
	$(PY) -m train --config configs/demo.py --workdir runs/demo

clean:
	rm -rf $(VENV) .pytest_cache
