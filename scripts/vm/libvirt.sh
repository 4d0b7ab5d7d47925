#!/usr/bin/env bash
# Make libvirt ready for `vagrant up --provider=libvirt` on a host without
# systemd (as CI's): virtlogd and libvirtd started if they are not running,
# and the `default` storage pool (vagrant-libvirt's default) defined and
# started. No libvirt network is created or started. Idempotent.
set -euo pipefail
pgrep -x virtlogd >/dev/null || virtlogd -d
if ! pgrep -x libvirtd >/dev/null; then
    libvirtd -d
    for _ in $(seq 50); do virsh -q version >/dev/null 2>&1 && break; sleep 0.2; done
fi
if ! virsh -q pool-info default >/dev/null 2>&1; then
    mkdir -p /var/lib/libvirt/images
    virsh -q pool-define-as default dir --target /var/lib/libvirt/images >/dev/null
fi
# (not `| grep -q`: under pipefail, grep leaving early fails the pipeline)
[ "$(virsh -q pool-info default | sed -n 's/^State: *//p')" = running ] ||
    virsh -q pool-start default >/dev/null
virsh -q pool-autostart default >/dev/null
echo "libvirt: $(virsh -q version | head -1 | tr -s ' '); pool default at /var/lib/libvirt/images"
