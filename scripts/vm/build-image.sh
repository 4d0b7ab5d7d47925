#!/usr/bin/env bash
# Build (or reuse) a bootable Debian image for portrace's VM test, ready to
# become a Vagrant box (box.sh): debootstrap with the stock kernel and its
# matching headers, bcc, libbpf, systemd, sshd, sudo and rsync; the `vagrant`
# user with Vagrant's insecure key and passwordless sudo, as every Vagrant box
# has; DHCP on eth0; and an offline wheelhouse of portrace's Python
# dependencies for that release's Python, which pip uses by default (the VM
# has no network). PORTRACE_VM_SUITE picks the release: bookworm (Debian 12,
# kernel 6.1; the default) or trixie (Debian 13, 6.12).
# Output in DIR (default vagrant/.cache/SUITE, git-ignored):
#   rootfs/ (the tree), vmlinuz, initrd.img
# The project itself comes in through Vagrant's rsync synced folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
suite=${PORTRACE_VM_SUITE:-bookworm}
out=${1:-vagrant/.cache/$suite}
rootfs="$out/rootfs"
mkdir -p "$out"
packages=linux-image-amd64,linux-headers-amd64,initramfs-tools,python3-bpfcc,python3-venv,iproute2,libbpf1,procps,make,kmod,ca-certificates,systemd-sysv,dbus,libpam-systemd,openssh-server,sudo,rsync
if [ "$(cat "$rootfs/.portrace-built" 2>/dev/null)" != "$packages" ]; then
    rm -rf "$rootfs"
    start=$(date +%s)
    debootstrap --variant=minbase --include="$packages" \
        "$suite" "$rootfs" http://deb.debian.org/debian >"$out/debootstrap.log" 2>&1 \
        || { tail -20 "$out/debootstrap.log" >&2; exit 1; }
    echo "build-image: debootstrap took $(( $(date +%s) - start )) s"
    echo "$packages" > "$rootfs/.portrace-built"
fi
# What makes it a Vagrant box (cheap, so redone on every build).
key=$(find /usr/share/rubygems-integration /usr/lib/ruby /opt/vagrant -path '*/keys/vagrant.pub' \
      2>/dev/null | head -1 || true)
[ -n "$key" ] || { echo "build-image: Vagrant's insecure key (keys/vagrant.pub) not found" >&2; exit 1; }
chroot "$rootfs" id vagrant >/dev/null 2>&1 || chroot "$rootfs" useradd -m -s /bin/bash vagrant
owner=$(chroot "$rootfs" id -u vagrant):$(chroot "$rootfs" id -g vagrant)
install -d -m 0700 "$rootfs/home/vagrant/.ssh"
install -m 0600 "$key" "$rootfs/home/vagrant/.ssh/authorized_keys"
chown -R "$owner" "$rootfs/home/vagrant/.ssh"
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > "$rootfs/etc/sudoers.d/vagrant"
chmod 0440 "$rootfs/etc/sudoers.d/vagrant"
# eth0: the kernel's name (net.ifnames=0 on the box's command line).
printf '[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n' > "$rootfs/etc/systemd/network/eth0.network"
chroot "$rootfs" systemctl enable -q systemd-networkd
# QEMU's user networking, the box's one NIC, makes every connection from the
# host come from 10.0.2.2, and OpenSSH 9.8+ (Debian 13's 10.0) penalises a
# source address as a whole (PerSourcePenalties: grace-exceeded 10 s, enforced
# from 15 s). Under TCG, `vagrant up` leaves connections unauthenticated at
# boot; when LoginGraceTime (120 s) ends two of them, sshd refuses the host
# for ~20 s and every `vagrant ssh` then exits 255 ("kex_exchange_identification:
# Connection closed by remote host"). The NAT address is exempt where sshd knows
# the option (Debian 12's 9.2 does not, and needs nothing).
penalty_conf="$rootfs/etc/ssh/sshd_config.d/portrace-box.conf"
if [[ $(chroot "$rootfs" /usr/sbin/sshd -t -o PerSourcePenaltyExemptList=10.0.2.2 2>&1) == *"Bad configuration option"* ]]; then
    rm -f "$penalty_conf"
else
    echo 'PerSourcePenaltyExemptList 10.0.2.2' > "$penalty_conf"
fi
echo '/dev/vda / ext4 defaults 0 1' > "$rootfs/etc/fstab"
echo portrace-box > "$rootfs/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 portrace-box\n' > "$rootfs/etc/hosts"
printf '[global]\nno-index = true\nfind-links = /wheelhouse\n' > "$rootfs/etc/pip.conf"
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
