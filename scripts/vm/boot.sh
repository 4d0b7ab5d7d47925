#!/usr/bin/env bash
# Boot the Debian image (build-image.sh) under QEMU with this checkout in it.
# Inside, as init: provision exactly as the README does (vagrant/provision.sh,
# i.e. `make setup`, offline from the wheelhouse), run `portrace demo` on each
# engine, run a lab comparison, print everything on the serial console, power
# off. The console goes to stdout; sections are marked "=== NAME".
#   boot.sh [DIR] [TIMEOUT_S]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-vagrant/.cache/${PORTRACE_VM_SUITE:-bookworm}}
limit=${2:-2400}
rootfs="$out/rootfs"
[ -e "$rootfs/.portrace-built" ] || { echo "boot: no image; run build-image.sh" >&2; exit 1; }

rm -rf "$rootfs/portrace"
mkdir -p "$rootfs/portrace"
# bpf/core.bpf.o comes along, built on the host: the VM needs no clang.
tar --exclude=./.venv --exclude=./vagrant/.cache --exclude=./.git --exclude='*.egg-info' \
    --exclude=__pycache__ -cf - . | tar -xf - -C "$rootfs/portrace"

cat > "$rootfs/sbin/portrace-vm-init" <<'INIT'
#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
ip link set lo up
echo "=== kernel $(uname -r) headers $(readlink -f /lib/modules/$(uname -r)/build)"
export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse
cd /portrace
echo "=== provision"
bash vagrant/provision.sh /portrace
echo "=== provision-exit $?"
echo "=== demo"
.venv/bin/portrace demo
echo "=== demo-exit $?"
for engine in core bcc; do
    echo "=== demo-$engine"
    .venv/bin/portrace demo --engine "$engine"
    echo "=== demo-$engine-exit $?"
done
echo "=== lab"
.venv/bin/portrace lab restart-timewait connect-exhaustion \
    --compare net.ipv4.tcp_tw_reuse=0,1 --within 4
echo "=== lab-exit $?"
echo "=== lab-json"
.venv/bin/portrace lab restart-timewait connect-exhaustion \
    --compare net.ipv4.tcp_tw_reuse=0,1 --within 4 --json
echo "=== lab-json-exit $?"
echo "=== validate-sysctl"
bash vagrant/validate-sysctl.sh vagrant/sysctl/fin-timeout.conf restart-finwait2 restart-timewait
echo "=== validate-sysctl-exit $?"
echo "=== done"
sync
echo o > /proc/sysrq-trigger
sleep 30
INIT
chmod 0755 "$rootfs/sbin/portrace-vm-init"

img="$out/portrace-vm.ext4"
rm -f "$img"
mkfs.ext4 -q -F -L portrace -d "$rootfs" "$img" 6G
accel=tcg  # KVM hangs on this kind of host (nested); TCG boots a Debian kernel in ~12 s
start=$(date +%s)
timeout "$limit" qemu-system-x86_64 -accel "$accel" -cpu max -smp 2 -m 3072 \
    -nographic -no-reboot -serial mon:stdio -display none -nic none \
    -kernel "$out/vmlinuz" -initrd "$out/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 init=/sbin/portrace-vm-init panic=-1 quiet" \
    -drive "file=$img,format=raw,if=virtio" </dev/null
echo "=== vm-seconds $(( $(date +%s) - start ))"
