# make demo   the classic fp16 failure named, caught and repaired; the default run traced,
#             learning to see; where the reports are (scripts/demo.sh)
# make test   lint, format check and the test suite
# make bench  step time and memory vs a plain transformers+peft loop; tracing overhead
# make report-check  render real report pages in headless Chromium, fail on console errors
#
# Each target makes its own .venv. The CPU wheel torch==2.13.0 is installed by
# default; with a GPU keep the torch you already have:  make demo TORCH=skip
# (the venv then sees your system site-packages), or name another build:
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BENCH_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.stabilizer-installed

.PHONY: demo test lint bench venv clean report-check

venv: $(STAMP)

$(STAMP): pyproject.toml
ifeq ($(TORCH),skip)
	$(PYTHON) -m venv --system-site-packages $(VENV)
else
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH)
endif
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	VENV=$(VENV) bash scripts/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

# CPU part (the GPU part is benchmarks/gpu.sh, run on a machine with a GPU).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_loop.py --preset tiny-instructblip-t5 --batch-sizes 32 \
		--steps 20 --rounds 5 $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_loop.py --preset medium-instructblip-t5 --batch-sizes 4 \
		--steps 3 --rounds 3 $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_trace.py --preset tiny-instructblip-t5 --batch-size 32 \
		--steps 2 --rounds 20 $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_trace.py --preset medium-instructblip-t5 --batch-size 4 \
		--steps 1 --rounds 8 $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_ddp.py --preset tiny-instructblip-t5 --batch-size 16 $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_ddp.py --preset medium-instructblip-t5 --batch-size 4 \
		--steps 3 --rounds 3 --warmup 1 $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_plugin.py
	$(BIN)/python benchmarks/bench_plugin_suite.py
	$(BIN)/python benchmarks/bench_ops.py --preset tiny-instructblip-t5 --batch-size 4 $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_memory.py --preset tiny-instructblip-t5 --batch-size 32 $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_memory.py --preset medium-instructblip-t5 --batch-size 4 \
		--rounds 2 $(BENCH_ARGS)

# Open real report pages in headless Chromium (installs Debian's chromium as root if
# missing): first prove the checker catches a throw/console.error/broken image, then
# check the pages.
report-check: $(STAMP)
	$(BIN)/python scripts/report_check.py --self-test
	$(BIN)/python scripts/report_check.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
