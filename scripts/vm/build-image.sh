#!/usr/bin/env bash
# Build (or reuse) a bootable Debian image for portrace's VM test:
# debootstrap with the stock kernel and its matching headers, bcc, libbpf, and
# an offline wheelhouse of portrace's Python dependencies for that release's
# Python (the VM has no network). PORTRACE_VM_SUITE picks the release:
# bookworm (Debian 12, kernel 6.1; the default) or trixie (Debian 13, 6.12).
# Output in DIR (default vagrant/.cache/SUITE, git-ignored):
#   rootfs/ (the tree), vmlinuz, initrd.img
# The project itself is copied in by boot.sh on every run.
set -euo pipefail
cd "$(dirname "$0")/../.."
suite=${PORTRACE_VM_SUITE:-bookworm}
out=${1:-vagrant/.cache/$suite}
rootfs="$out/rootfs"
mkdir -p "$out"
if [ ! -e "$rootfs/.portrace-built" ]; then
    rm -rf "$rootfs"
    start=$(date +%s)
    debootstrap --variant=minbase \
        --include=linux-image-amd64,linux-headers-amd64,initramfs-tools,python3-bpfcc,python3-venv,iproute2,libbpf1,procps,make,kmod,ca-certificates \
        "$suite" "$rootfs" http://deb.debian.org/debian >"$out/debootstrap.log" 2>&1 \
        || { tail -20 "$out/debootstrap.log" >&2; exit 1; }
    echo "build-image: debootstrap took $(( $(date +%s) - start )) s"
    touch "$rootfs/.portrace-built"
fi
# The wheelhouse: what `make setup` pip-installs (pyproject's dependencies and
# test extras), as wheels for the image's Python; rebuilt when that list changes.
mapfile -t wanted < <(.venv/bin/python -c '
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(["wheel", *p["build-system"]["requires"],
                 *p["project"]["dependencies"], *p["project"]["optional-dependencies"]["test"]]))')
if [ "$(cat "$rootfs/wheelhouse/.complete" 2>/dev/null)" != "${wanted[*]}" ]; then
    rm -rf "$rootfs/wheelhouse"
    mkdir -p "$rootfs/wheelhouse"
    pyver=$(chroot "$rootfs" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    .venv/bin/python -m pip download -q --disable-pip-version-check -d "$rootfs/wheelhouse" \
        --python-version "$pyver" --only-binary=:all: "${wanted[@]}" 2>&1 \
        | grep -v '^WARNING: Location' || true
    echo "${wanted[*]}" > "$rootfs/wheelhouse/.complete"
fi
cp -L "$rootfs"/boot/vmlinuz-* "$out/vmlinuz"
cp -L "$rootfs"/boot/initrd.img-* "$out/initrd.img"
echo "build-image: ready in $out ($(du -sh "$rootfs" | cut -f1))"
