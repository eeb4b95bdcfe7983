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

FASHION = /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

demo: $(STAMP)
	@if [ ! -e $(FASHION) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
		|| echo "apt-get could not install dataset-fashion-mnist: the demo uses scikit-learn's digits"; fi
	$(VENV)/bin/mdprune demo

test: $(STAMP)
	$(VENV)/bin/ruff check mdprune tests bench
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check mdprune tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
