#!/usr/bin/env bash
# `make image`: portrace's container image, built offline from this checkout
# (no registry, no Docker): a Debian 12 minbase root with python3, libbpf1 and
# portrace's dependencies as Debian packages, the project's own wheel unpacked
# into it (it carries the CO-RE object), written as a one-layer OCI archive by
# scripts/oci_image.py. The CO-RE engine only: bcc would need kernel headers
# for every node's kernel. Runs as root (debootstrap).
#   bash scripts/image.sh [OUT.tar]   (default build/portrace-image.tar)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/portrace-image.tar}
name="localhost/portrace:$(.venv/bin/python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
cache=build/image
rootfs=$cache/rootfs
# pyproject's dependencies, as bookworm packages them (versions satisfy it).
packages=python3,libbpf1,python3-click,python3-pyroute2,python3-psutil,python3-pyelftools,python3-prometheus-client
mkdir -p "$cache"
if [ "$(cat "$cache/packages" 2>/dev/null)" != "$packages" ]; then
    rm -rf "$rootfs"
    start=$(date +%s)
    debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" \
        http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1 \
        || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    # What a container does not need: apt's lists and caches, docs, man pages.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    echo "$packages" > "$cache/packages"
    echo "image: debootstrap took $(( $(date +%s) - start )) s"
fi
# The project's wheel, unpacked where Debian's python3 finds it.
rm -rf "$cache/wheel" "$rootfs/usr/local/lib/python3.11/dist-packages/portrace"*
.venv/bin/python -m pip wheel -q --no-deps --disable-pip-version-check -w "$cache/wheel" . 2>&1 \
    | grep -v '^WARNING: Location' || true
site=$rootfs/usr/local/lib/python3.11/dist-packages
mkdir -p "$site"
.venv/bin/python -m zipfile -e "$cache"/wheel/portrace-*.whl "$site"
printf '#!/usr/bin/python3\nimport sys\nfrom portrace.launch import main\nsys.exit(main())\n' \
    > "$rootfs/usr/local/bin/portrace"
chmod 755 "$rootfs/usr/local/bin/portrace"
# A non-root container gets no capability at exec unless the executable holds
# it (Kubernetes sets no ambient capabilities): the interpreter may take each
# capability portrace can use, as permitted only, and gets those the pod's
# securityContext leaves in its bounding set; portrace makes them effective
# and names any it still lacks (portrace.kernel.capabilities).
caps=$(.venv/bin/python -c 'from portrace.kernel.capabilities import CAPABILITIES as C; print(",".join(c.name.lower() for c in C))')
setcap "$caps+p" "$(readlink -f "$rootfs/usr/bin/python3")"
unshare --pid --fork --mount-proc="$rootfs/proc" chroot "$rootfs" /usr/local/bin/portrace --version
.venv/bin/python scripts/oci_image.py "$rootfs" --name "$name" -o "$out" \
    --entrypoint /usr/local/bin/portrace --user 65534:65534
echo "image: $name in $out ($(du -h "$out" | cut -f1))"
