# The two front-door commands. Each builds .venv from nothing when it is missing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Two pytest workers: most test time is XLA compilation, which is single-threaded.
PYTEST_WORKERS ?= 2

.PHONY: test demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -n $(PYTEST_WORKERS) -q

# A fresh run each time (a kept workdir would resume at the last step and only re-evaluate).
demo: $(STAMP)
	rm -rf runs/demo
	$(PY) -m train --config configs/demo.py --workdir runs/demo

clean:
	rm -rf $(VENV) .pytest_cache
