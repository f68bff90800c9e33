# The two commands of the README:  `make demo`  (the main job)  and  `make test`  (everything, as CI runs it);
# `make test-fast` leaves out the tests marked slow or slurm (setup.cfg). All create .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: env demo test test-fast
env:
	@bash launch/setup_env.sh $(VENV)

demo: env
	$(PY) benchmarks/flops_check.py
	PYTHON=$(PY) bash launch/demo.sh

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: env
	$(PY) -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS)
