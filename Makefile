# sudo make demo   set up, then diagnose two real, staged conflicts
# sudo make test   set up (with the test tools), then the whole suite (lint + tests)
.PHONY: setup setup-test demo test lint bench clean

VENV := .venv

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

demo: setup
	$(VENV)/bin/portrace demo

lint: setup-test
	$(VENV)/bin/ruff check src tests bench
	shellcheck scripts/*.sh scripts/vm/*.sh vagrant/*.sh .ci/run

test: lint
	$(VENV)/bin/python -m pytest

bench: setup
	$(VENV)/bin/python bench/startup.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
