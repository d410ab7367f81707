# make run  : set everything up (virtual env, CPU PyTorch, the package) and run the default experiment
# make test : set everything up and run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch: a local wheel when pip's find-links has one, else PyTorch's CPU index
# (never the multi-GB CUDA build by accident: the +cpu version only exists as a CPU build).
# For a CUDA machine: make setup TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://pypi.org/simple
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup run test ui clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" 2>/dev/null || \
		$(PY) -m pip install -q "$(TORCH_SPEC)" --extra-index-url $(TORCH_INDEX)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: setup
	$(PY) -m runner $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db

clean:
	rm -rf outputs/runs outputs/multirun
