#!/usr/bin/env bash
# Idempotent host setup for portrace, run as root (`sudo make setup`):
#  1. OS packages: python3-bpfcc (bcc's Python bindings), python3-venv, iproute2,
#     libbpf1 (the CO-RE engine's loader);
#     with --test, also what the tests use: chromium (the HTML report is opened
#     in it), systemd (systemd-analyze, systemd-socket-activate), vagrant (vagrant
#     validate), pipx (the README's install line), shellcheck,
#     debootstrap + e2fsprogs + qemu-utils (the VM test's boxes) and
#     vagrant-libvirt + libvirt-daemon-system + libvirt-daemon-driver-qemu +
#     qemu-system-x86 (the VM test's `vagrant up`), containerd + runc +
#     busybox-static (a Kubernetes node's runtime and the pods' images,
#     tests/cri.py), libcap2-bin (setcap: the portrace image's file
#     capabilities, scripts/image.sh), and clang + libbpf-dev to
#     build the tests' own BPF programs (tests/bpf/); with --bench,
#     bpfcc-tools (bcc's tcpstates, the benchmarks' anchor) and bpftool;
#  2. the CO-RE engine's object, bpf/core.bpf.o, when missing or stale: clang,
#     llvm and libbpf-dev are installed for that build only (run time needs
#     none of them, nor kernel headers);
#  3. kernel headers for bcc (the fallback engine): linux-headers-$(uname -r) when the distribution
#     has it, else its generic headers package linked as /lib/modules/$(uname -r)/build;
#  4. tracefs (and debugfs) mounted;
#  5. .venv from the interpreter bcc belongs to, with --system-site-packages,
#     and portrace installed into it with its test extras (with --test, also
#     the k8s extras: the CRI API's stubs the Kubernetes tests drive containerd
#     with, and the Kubernetes API's schemas the DaemonSet is checked against).
set -euo pipefail

cd "$(dirname "$0")/.."
KREL=$(uname -r)
WITH_TESTS=0
WITH_BENCH=0
[ "${1:-}" = "--test" ] && WITH_TESTS=1
[ "${1:-}" = "--bench" ] && WITH_BENCH=1
SYS_PY=/usr/bin/python3
say() { printf 'setup: %s\n' "$*"; }
warn() { printf 'setup: WARNING: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (sudo make setup)" >&2
    exit 3
fi

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
missing() {
    local pkg out=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || out+=("$pkg")
    done
    echo "${out[@]:-}"
}

# 1. OS packages
packages="python3-bpfcc python3-venv iproute2 procps libbpf1 make"
# tcpstates (the anchor) and bpftool (programs' run time)
[ "$WITH_BENCH" -eq 1 ] && packages="$packages bpfcc-tools bpftool"
[ "$WITH_TESTS" -eq 1 ] && packages="$packages chromium systemd vagrant shellcheck debootstrap qemu-system-x86 e2fsprogs pipx qemu-utils vagrant-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu containerd runc busybox-static libcap2-bin"
# shellcheck disable=SC2086
need=$(missing $packages)
if [ -n "$need" ]; then
    say "installing $need"
    # shellcheck disable=SC2086
    apt_install $need
fi

# Build a make target with clang, installing clang, llvm and libbpf's headers
# for the build only when missing: build TARGET WHAT
build() {
    local need
    need=$(missing clang llvm libbpf-dev)
    if [ -n "$need" ]; then
        say "installing $need (to build $2)"
        # shellcheck disable=SC2086
        apt_install $need
    fi
    make -s "$1"
    say "built $2"
}

# 2. The CO-RE object (shipped prebuilt in a wheel or a copied checkout)
if ! make -s -q core-object 2>/dev/null; then
    build core-object bpf/core.bpf.o
else
    say "CO-RE object: bpf/core.bpf.o"
fi
# The tests' own BPF programs (tests/bpf/)
if [ "$WITH_TESTS" -eq 1 ] && ! make -s -q test-objects 2>/dev/null; then
    build test-objects "the tests' BPF programs (tests/bpf/)"
fi

# 3. Kernel headers
build="/lib/modules/$KREL/build"
if [ -d "$build/include" ]; then
    say "kernel headers: $build"
else
    if [ "$apt_updated" -eq 0 ]; then apt-get update -qq; apt_updated=1; fi
    if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1; then
        say "installing linux-headers-$KREL"
        apt_install "linux-headers-$KREL"
    else
        # shellcheck source=/dev/null
        . /etc/os-release
        case "${ID:-}" in
            ubuntu) generic=linux-headers-generic ;;
            *) generic="linux-headers-$(dpkg --print-architecture)" ;;
        esac
        say "no linux-headers-$KREL package for this (custom) kernel; using $generic"
        apt_install "$generic"
        # The newest headers the generic package pulled in, and their common half.
        hdr=""
        for d in /usr/src/linux-headers-*/; do
            d=${d%/}
            case "$d" in *-common) continue ;; esac
            [ -d "$d/include" ] || continue
            if [ -z "$hdr" ] || [ "$(printf '%s\n%s\n' "$hdr" "$d" | sort -V | tail -n1)" = "$d" ]; then
                hdr=$d
            fi
        done
        [ -n "$hdr" ] || { echo "setup: $generic installed no headers under /usr/src" >&2; exit 5; }
        common="${hdr%-*}-common"
        mkdir -p "/lib/modules/$KREL"
        ln -sfn "$hdr" "$build"
        [ -d "$common" ] && ln -sfn "$common" "/lib/modules/$KREL/source"
        warn "linked $hdr as $build for kernel $KREL."
        warn "This is safe for portrace's probes only because they read tracepoint arguments and"
        warn "user memory, whose layout bcc takes from the running kernel's tracefs format files;"
        warn "struct offsets from these headers would be wrong for $KREL, so no probe uses them."
    fi
fi

# 4. tracefs / debugfs
if [ ! -d /sys/kernel/tracing/events ]; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
fi
if ! mountpoint -q /sys/kernel/debug 2>/dev/null; then
    mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
fi
if [ -d /sys/kernel/tracing/events ] || [ -d /sys/kernel/debug/tracing/events ]; then
    say "tracefs: mounted"
else
    echo "setup: could not mount tracefs at /sys/kernel/tracing" >&2
    exit 4
fi

# 5. venv on the interpreter that owns bcc
if ! "$SYS_PY" -c 'import bcc' 2>/dev/null; then
    echo "setup: $SYS_PY cannot import bcc even after installing python3-bpfcc" >&2
    exit 8
fi
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
    say "creating .venv from $SYS_PY with --system-site-packages"
    rm -rf .venv
    "$SYS_PY" -m venv --system-site-packages .venv
fi
extras="test"
[ "$WITH_TESTS" -eq 1 ] && extras="test,k8s"
stamp=.venv/.portrace-installed-${extras/,/-}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing portrace into .venv (with extras $extras)"
    # PIP_* settings pass through (e.g. PIP_NO_INDEX/PIP_FIND_LINKS for an offline VM).
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]" 2>&1 \
        | grep -v '^WARNING: Location' || true
    .venv/bin/python -c 'import portrace.launch, portrace.commands.cli, bcc, pyroute2, psutil, click, elftools'
    if [ "$WITH_TESTS" -eq 1 ]; then
        .venv/bin/python -c 'import grpc, cri_api.v1.api_pb2_grpc, yaml, kubernetes_validate'
    fi
    touch "$stamp"
fi
say "ready: .venv/bin/portrace"
