# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/smoke
DEMO_OUT ?= out/demo

.PHONY: venv test demo smoke bench lint clean

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
	$(BIN)/python -m mypy

demo: venv
	mkdir -p $(DEMO_OUT)
	$(BIN)/stxd-data synth --config configs/data/synth.yaml --out $(DEMO_OUT)/data --reuse
	$(BIN)/stxd-data check --dataroot $(DEMO_OUT)/data --version v1.0-synth --no-files
	$(MAKE) $(DEMO_OUT)/teacher/teacher.pt
	$(BIN)/stxd-train eval --run $(DEMO_OUT)/teacher
	$(BIN)/stxd-cache extract --dataroot $(DEMO_OUT)/data --version v1.0-synth --splits synth_train,synth_val \
		--teacher $(DEMO_OUT)/teacher/teacher.pt --config configs/cache/synth.yaml --out $(DEMO_OUT)/cache.zarr
	$(BIN)/stxd-cache verify $(DEMO_OUT)/cache.zarr --dataroot $(DEMO_OUT)/data
	$(MAKE) $(DEMO_OUT)/bevformer/student.pt $(DEMO_OUT)/bevformer_stxd/student.pt
	$(BIN)/stxd-train eval --run $(DEMO_OUT)/bevformer
	$(BIN)/stxd-train eval --run $(DEMO_OUT)/bevformer_stxd
	$(BIN)/stxd-train compare --run $(DEMO_OUT)/bevformer --run $(DEMO_OUT)/bevformer_stxd

# The demo teacher trains once (about 15 minutes on 2 cores); delete the folder to train it again.
$(DEMO_OUT)/teacher/teacher.pt:
	rm -rf $(DEMO_OUT)/teacher
	$(BIN)/stxd-train teacher --config configs/teacher/centerpoint_synth.yaml --dataroot $(DEMO_OUT)/data \
		--version v1.0-synth --out $(DEMO_OUT)/teacher --no-eval

# The demo students train once each against the demo cache (about 20 minutes each on 2 cores): the plain
# student, and the same student distilled with CD + TD + RD.
$(DEMO_OUT)/bevformer/student.pt:
	rm -rf $(DEMO_OUT)/bevformer
	$(BIN)/stxd-train fit --config configs/student/bevformer_synth.yaml --dataroot $(DEMO_OUT)/data \
		--version v1.0-synth --cache $(DEMO_OUT)/cache.zarr --out $(DEMO_OUT)/bevformer

$(DEMO_OUT)/bevformer_stxd/student.pt:
	rm -rf $(DEMO_OUT)/bevformer_stxd
	$(BIN)/stxd-train fit --config configs/student/bevformer_synth.yaml --dataroot $(DEMO_OUT)/data \
		--version v1.0-synth --cache $(DEMO_OUT)/cache.zarr --out $(DEMO_OUT)/bevformer_stxd \
		--set "distill.terms=[cd,td,rd]"

smoke: venv
	mkdir -p $(OUT)
	$(BIN)/stxd-data synth --config configs/data/synth_tiny.yaml --out $(OUT)/data --reuse
	$(BIN)/stxd-data check --dataroot $(OUT)/data --version v1.0-synth
	rm -rf $(OUT)/teacher $(OUT)/cache.zarr $(OUT)/student
	$(BIN)/stxd-train teacher --config configs/teacher/centerpoint_synth.yaml --dataroot $(OUT)/data \
		--version v1.0-synth --out $(OUT)/teacher --set train.max_steps=20 --set train.checkpoint_every=10 \
		--set train.log_every=5
	$(BIN)/stxd-cache extract --dataroot $(OUT)/data --version v1.0-synth --splits synth_train,synth_val \
		--teacher $(OUT)/teacher/teacher.pt --config configs/cache/synth.yaml --out $(OUT)/cache.zarr
	$(BIN)/stxd-cache verify $(OUT)/cache.zarr --dataroot $(OUT)/data
	$(BIN)/stxd-cache info $(OUT)/cache.zarr
	$(BIN)/stxd-train fit --config configs/student/bevformer_synth.yaml --dataroot $(OUT)/data --version v1.0-synth \
		--cache $(OUT)/cache.zarr --out $(OUT)/student --set train.max_steps=4 --set train.log_every=2 \
		--set "distill.terms=[cd,td,rd]"
	$(BIN)/stxd-train eval --run $(OUT)/student

# The four benchmarks in their quick mode (7.5 to 10 minutes on 2 cores) → BENCHMARKS.md. Uses the demo teacher
# and cache when `make demo` made them, else a teacher trained for 10 steps and its cache in out/bench.
bench: venv
	mkdir -p $(DEMO_OUT) out/bench
	$(BIN)/stxd-data synth --config configs/data/synth.yaml --out $(DEMO_OUT)/data --reuse
	$(BIN)/python benchmarks/run_all.py --quick --dataroot $(DEMO_OUT)/data --work out/bench --out BENCHMARKS.md

# The distillation-gain protocol (benchmarks/distill_gain.py): the configs/data/synth_bench.yaml dataset (30 train,
# 10 val, 20 held-out test scenes), the teacher and its cache, then the grid of benchmarks/distill_gain_grid.yaml
# (36 fits of 800 steps: bevformer_synth plain and STXD on 8 seeds, mse, cd and cd_td on 4 of them, uvtr_synth
# plain and STXD on 4), each scored on synth_test; results in benchmarks/results/distill_gain.json and .md.
# Resumable: after a kill, run it again. On 2 CPU cores (as the host varies): the dataset 8-25 min, the teacher
# 40-90 min, the grid 8-10 hours with 2 runs at a time. On a GPU: make distill-gain DISTILL_GAIN_ARGS="--device cuda".
DISTILL_GAIN_ARGS ?= --parallel 2
DISTILL_GAIN_OUT ?= out/distill_gain
.PHONY: distill-gain
distill-gain: venv
	mkdir -p $(DISTILL_GAIN_OUT)
	$(BIN)/python benchmarks/distill_gain.py --work $(DISTILL_GAIN_OUT) $(DISTILL_GAIN_ARGS)

clean:
	rm -rf out .pytest_cache
