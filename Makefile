# sudo make demo   set up, then diagnose two real, staged conflicts
# sudo make test   set up (with the test tools), then the whole suite (lint + tests)
# make check       no root, no apt: ruff, mypy and the tests that need no root,
#                  in their own venv (.venv-check) from any python3 >= 3.9
.PHONY: setup setup-test demo test lint check bench clean core-object test-objects image

VENV := .venv
# Judging is pure functions of an observation: held to mypy --strict.
STRICT := src/portrace/judge src/portrace/observe
# The CO-RE engine's object: built once (clang + libbpf-dev), relocated by
# libbpf against the running kernel's BTF at load, shipped as package data.
CORE_OBJ := bpf/core.bpf.o
BPF_ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')

core-object: $(CORE_OBJ)

CORE_SRC := bpf/core.bpf.c bpf/kernel_types.h bpf/portrace.h bpf/calls.h
CORE_CFLAGS := -g -O2 -target bpf -mcpu=v3 -D__TARGET_ARCH_$(BPF_ARCH) -Wall -Werror -Ibpf

$(CORE_OBJ): $(CORE_SRC)
	clang $(CORE_CFLAGS) -c bpf/core.bpf.c -o $@.tmp
	llvm-strip -g $@.tmp 2>/dev/null || true
	mv $@.tmp $@

# The tests' own BPF programs (cgroup bind4 refusals), built by setup-test.
TEST_OBJS := $(patsubst %.c,%.o,$(wildcard tests/bpf/*.bpf.c))
test-objects: $(TEST_OBJS)

# The churn's load generator, in C: a Python client hides a tracer's cost.
bench/churn: bench/churn.c
	cc -O2 -Wall -Werror -o $@ $<

# Variants of the CO-RE object (tests/bpf/core_*.bpf.c include bpf/core.bpf.c).
tests/bpf/core_%.bpf.o: tests/bpf/core_%.bpf.c $(CORE_SRC)
	clang $(CORE_CFLAGS) -c $< -o $@

tests/bpf/%.bpf.o: tests/bpf/%.bpf.c
	clang -g -O2 -target bpf -I/usr/include/$(shell uname -m)-linux-gnu -Wall -Werror \
		-c $< -o $@

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

demo: setup
	$(VENV)/bin/portrace demo

lint: setup-test
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/python -m mypy
	$(VENV)/bin/python -m mypy --strict $(STRICT)
	shellcheck scripts/*.sh scripts/vm/*.sh vagrant/*.sh .ci/run

test: lint
	$(VENV)/bin/python -m pytest

CHECK_VENV := .venv-check
$(CHECK_VENV)/.installed: pyproject.toml
	test -x $(CHECK_VENV)/bin/python || python3 -m venv $(CHECK_VENV)
	$(CHECK_VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[test,k8s]'
	touch $@

check: $(CHECK_VENV)/.installed
	$(CHECK_VENV)/bin/ruff check src tests bench
	$(CHECK_VENV)/bin/python -m mypy
	$(CHECK_VENV)/bin/python -m mypy --strict $(STRICT)
	$(CHECK_VENV)/bin/python -m pytest -m "not root and not vm"

# portrace's container image (deploy/kubernetes/), offline: build/portrace-image.tar
image: setup
	bash scripts/image.sh

bench: setup bench/churn test-objects
	bash scripts/setup.sh --bench
	$(VENV)/bin/python bench/engines.py
	$(VENV)/bin/python bench/lookup.py
	$(VENV)/bin/python bench/flood.py
	$(VENV)/bin/python bench/hostile.py
	$(VENV)/bin/python bench/check.py

clean:
	rm -rf $(VENV) $(CHECK_VENV) build src/*.egg-info .pytest_cache .ruff_cache .mypy_cache \
		$(CORE_OBJ) $(TEST_OBJS)
