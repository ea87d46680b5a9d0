# Two commands on a fresh machine:  make demo   (edit the default model)  and  make test.
# Both install what they need into .venv first. On a CPU-only machine torch is installed as the
# CPU build (TORCH_SPEC); GPU users: `make venv TORCH_SPEC=torch` or install torch yourself first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: venv demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first: a bare `torch` requirement would otherwise pull the CUDA build on CPU machines.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/python scripts/train.py fit --config configs/quickstart.yaml

test: venv
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) lightning_logs
