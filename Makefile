# qlab — every target creates the virtual environment on first use.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed

.PHONY: demo test bench lint figures gpu-check fuzz third-party clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: this machine holds a local CPU wheel of exactly this version.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,hub,notebooks]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/qlab demo

# One OpenMP thread per test process: the tests spawn extra ranks and subprocesses, and
# spin-waiting threads on a busy 2-core machine made small ops up to 10x slower. The demo
# keeps torch's default (all cores), about 2x faster for training on an idle machine.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

# The property-based fuzz suite at depth: 1,000 mutated files per input format
# (make test runs the same suite with 60).
fuzz: $(STAMP)
	QLAB_FUZZ_EXAMPLES=1000 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests/fuzz

# bench_codecs measures the artifact codec on the demo's trained checkpoint: run the demo first.
bench: $(STAMP) runs/demo/model.qlab
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks

# Downloads two small GPTs trained by others (pinned commits and SHA-256, about 1.7 MB) into
# data/third_party/; bench_codecs then adds their rows. Needs the network; not part of CI.
third-party: $(STAMP)
	$(BIN)/python -m benchmarks.third_party

runs/demo/model.qlab: $(STAMP)
	$(BIN)/qlab demo --out runs/demo

# On a CUDA machine: the record preset for 200 steps (compile + bf16), NS5, GPTQ, a 1M-token
# sliding eval and peak memory, in one table (benchmarks/gpu_check.py; --dry-run on a CPU).
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check

lint: $(STAMP)
	$(BIN)/ruff check qlab tests benchmarks
	$(BIN)/ruff format --check qlab tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy

figures: $(STAMP)
	$(BIN)/qlab figures --out figures

clean-venv:
	rm -rf $(VENV)
