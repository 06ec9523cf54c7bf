# Two commands for a new machine:  `make demo` (the main job on an embedded default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= demo

.PHONY: demo test test-slow venv plans bench clean

$(VENV)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	# Pinned CPU build first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Generate a small DeepSeek-V3 FP8 checkpoint, plan hf2mcore at TP2 PP2 EP2 (grouped GEMM, MTP), run it, show it,
# then convert it back to HF FP8.
demo: venv
	rm -rf $(DEMO)
	$(VENV)/bin/streamconv synth --preset tiny --fp8 --save-dir $(DEMO)/hf
	$(VENV)/bin/streamconv plan hf2mcore --load-dir $(DEMO)/hf --save-dir $(DEMO)/mcore \
	    --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2 --target-expert-parallel-size 2 \
	    --moe-grouped-gemm --mtp-num-layers 1 --output $(DEMO)/plan.json
	$(VENV)/bin/streamconv run $(DEMO)/plan.json
	$(VENV)/bin/streamconv inspect $(DEMO)/mcore
	# and back: the layout comes from the record hf2mcore left; FP8 again, with the original scales
	$(VENV)/bin/streamconv convert mcore2hf --load-dir $(DEMO)/mcore --save-dir $(DEMO)/hf-back \
	    --fp8-export --fp8-scales-from $(DEMO)/hf --no-progress
	$(VENV)/bin/streamconv inspect $(DEMO)/hf-back

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

# Re-generate the saved example plans in plans/ (a test checks they are in sync).
plans: venv
	$(PY) plans/generate.py && $(PY) plans/recipes.py

bench: venv
	$(PY) -m pip install --quiet -e '.[bench]' && $(PY) -m benchmarks

clean:
	rm -rf $(DEMO) bench-out .pytest_cache
