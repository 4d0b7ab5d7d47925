# sudo make demo   set up, then diagnose two real, staged conflicts
# sudo make test   set up (with the test tools), then the whole suite (lint + tests)
.PHONY: setup setup-test demo test lint bench clean core-object

VENV := .venv
# The CO-RE engine's object: built once (clang + libbpf-dev), relocated by
# libbpf against the running kernel's BTF at load, shipped as package data.
CORE_OBJ := bpf/core.bpf.o
BPF_ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')

core-object: $(CORE_OBJ)

$(CORE_OBJ): bpf/core.bpf.c bpf/kernel_types.h bpf/portrace.h bpf/calls.h
	clang -g -O2 -target bpf -mcpu=v3 -D__TARGET_ARCH_$(BPF_ARCH) -Wall -Werror \
		-Ibpf -c bpf/core.bpf.c -o $@.tmp
	llvm-strip -g $@.tmp 2>/dev/null || true
	mv $@.tmp $@

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
	bash scripts/setup.sh --bench
	$(VENV)/bin/python bench/engines.py
	$(VENV)/bin/python bench/flood.py
	$(VENV)/bin/python bench/hostile.py
	$(VENV)/bin/python bench/check.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache $(CORE_OBJ)
