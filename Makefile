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
	$(PY) -m fdmobilenet.predict --checkpoint ../shared/fixtures/original/0.25x-FDMobileNet-224.pth.tar --model 0.25 --sample-cat
	PYTHON=$(PY) bash launch/demo.sh

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)
