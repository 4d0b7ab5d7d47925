# sudo make demo   set up, then diagnose two real, staged conflicts
# sudo make test   set up, then the whole suite (lint + tests, BPF ones included)
.PHONY: setup demo test lint bench clean

VENV := .venv

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/portrace demo

lint: setup
	$(VENV)/bin/ruff check src tests bench

test: lint
	$(VENV)/bin/python -m pytest

bench: setup
	$(VENV)/bin/python bench/startup.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
