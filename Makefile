# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/smoke
DEMO_OUT ?= out/demo

.PHONY: venv test demo smoke lint clean

venv: $(STAMP)

# Re-install when pyproject.toml changes. torch comes first and pinned, so that the CPU wheel on
# disk (or the CUDA wheel you installed yourself) satisfies the project's range and pip pulls nothing else.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .

demo: venv
	$(BIN)/stxd-data synth --config configs/data/synth.yaml --out $(DEMO_OUT)/data --reuse
	$(BIN)/stxd-data check --dataroot $(DEMO_OUT)/data --version v1.0-synth

smoke: venv
	$(BIN)/stxd-data synth --config configs/data/synth_tiny.yaml --out $(OUT)/data --reuse
	$(BIN)/stxd-data check --dataroot $(OUT)/data --version v1.0-synth

clean:
	rm -rf out .pytest_cache
