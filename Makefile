# Two entry points for a fresh clone (see README):
#   make demo   installs into .venv and runs the main job on the offline default
#   make test   installs into .venv and runs the default (fast, CPU) tests
# torch is installed first and pinned: on a CPU-only machine pip then takes the local CPU
# wheel; a bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
# e.g. make test PYTEST_ARGS='--shuffle 7' (or --reverse-files): the same tier in another order

.PHONY: install demo test test-all clean-cache chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python easy_train.py setup --out outputs/setup
	$(BIN)/python ray_jobs/train.py

# The serving tests drive the try-on page in Debian's chromium (Playwright never downloads a browser).
chromium:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

test: install chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: install chromium
	$(BIN)/python -m pytest -m "" 

clean-cache:
	rm -rf $${CATVTON_CACHE:-$$HOME/.cache/catvton}
