# One-command set-up on a fresh machine: `make demo` (train + evaluate on generated demo data), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DATA ?= demo_data
DEMO_RUN ?= runs/demo

.PHONY: install demo test test-slow clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Stamp file so a second `make` does not reinstall; pyproject changes trigger a reinstall.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[train,export,dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	@test -f $(DEMO_DATA)/DEMO_DATASET.json || $(BIN)/grad-demo-data $(DEMO_DATA)
	$(BIN)/grad-train --data $(DEMO_DATA) -o $(DEMO_RUN)
	$(BIN)/grad-eval $(DEMO_RUN)/model.pt

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	GRAD_RUN_SLOW=1 $(BIN)/python -m pytest -q

clean-demo:
	rm -rf $(DEMO_RUN) $(DEMO_DATA) cache/features
