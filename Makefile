# One-command setup: `make demo` and `make test` each create .venv and install mdprune with its dev extras.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import mdprune, torch, torchvision, timm" 
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mdprune inspect resnet50

test: $(STAMP)
	$(VENV)/bin/ruff check mdprune tests bench
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check mdprune tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
