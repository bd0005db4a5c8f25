# Two set-up commands: `make serve` and `make test`. Both create .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned, so pip takes the local CPU build and never resolves gigabytes of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0

.PHONY: serve test test-all venv venv-test browser check-reference clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

# Debian's Chromium for the playground's browser test (scripts/install-browser.sh; STEP1X_SKIP_BROWSER=1 skips)
browser:
	bash scripts/install-browser.sh

serve: venv
	$(BIN)/step1x-edit serve $(ARGS)

test: venv-test browser
	$(BIN)/python -m pytest $(ARGS)

# the default suite plus the checks marked slow
test-all: venv-test browser
	$(BIN)/python -m pytest -m "" $(ARGS)

check-reference: venv
	$(BIN)/step1x-edit check-reference ../shared/golden/tiny-a
	$(BIN)/step1x-edit check-reference ../shared/golden/tiny-a-v1p1

clean:
	rm -rf $(VENV) .pytest_cache
