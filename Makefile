# The two commands of the README:  `make demo`  (the main job)  and  `make test`.
# Both create .venv first (launch/setup_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: env demo test
env:
	@bash launch/setup_env.sh $(VENV)

demo: env
	$(PY) benchmarks/flops_check.py
	PYTHON=$(PY) bash launch/demo.sh

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)
