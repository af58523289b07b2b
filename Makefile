# Two commands for a new user: `make demo` and `make test`. Both create .venv
# and install on first use. CONSTRAINTS pins the CPU torch wheel found on this
# machine; on a GPU cluster install torch first and run with CONSTRAINTS=.
PYTHON      ?= python3
VENV        ?= .venv
CONSTRAINTS ?= constraints.txt
BIN         := $(VENV)/bin
CLI         := $(BIN)/marsseg-cli
DEMO        ?= demo
PIP_C       := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
export RAY_AUTH_MODE ?= disabled

.PHONY: install demo test test-fast bench gpu-check lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(CONSTRAINTS),$(BIN)/pip install -q $(PIP_C) torch,)
	$(BIN)/pip install -q $(PIP_C) -e '.[test]'
	touch $@

demo: install
	$(CLI) synth --out $(DEMO)/synth.npz --n-train 400 --n-test 120 --seed 0
	$(CLI) prepare --data $(DEMO)/synth.npz --out $(DEMO)/shards --force
	$(CLI) inspect --data $(DEMO)/shards
	$(CLI) train-folds --data $(DEMO)/shards --recipe ensembles/demo.toml --out $(DEMO)/runs/demo
	$(CLI) predict --ensemble $(DEMO)/runs/demo --data $(DEMO)/shards --out $(DEMO)/submission.csv --tta
	$(CLI) evaluate --ensemble $(DEMO)/runs/demo --data $(DEMO)/shards --tta
	$(CLI) report --ensemble $(DEMO)/runs/demo --data $(DEMO)/shards --out $(DEMO)/report
	@echo "demo outputs: $(DEMO)/submission.csv  $(DEMO)/runs/demo/scores.json  $(DEMO)/report/"

test: install
	$(BIN)/python -m pytest -q -ra --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow and not slurm"

bench: install
	$(BIN)/python -m bench

# The GPU path end to end (bench/gpu_check.py, a few minutes on one GPU): uses .venv when
# its torch sees CUDA, else a .venv-gpu over the machine's own CUDA torch (.ci/gpu-check).
gpu-check:
	PYTHON=$(PYTHON) VENV=$(VENV) .ci/gpu-check $(ARGS)

# ruff, then .ci/sizes.py: no file in marsseg/ or cli/ over 450 lines, no function over 80
lint: install
	$(BIN)/ruff check marsseg cli tests bench
	$(BIN)/python .ci/sizes.py marsseg cli --max-file 450 --max-function 80

clean:
	rm -rf $(DEMO) runs .pytest_cache
