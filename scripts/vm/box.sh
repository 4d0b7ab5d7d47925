#!/usr/bin/env bash
# Pack the Debian image (build-image.sh) as a Vagrant box for libvirt and add
# it to Vagrant as portrace/debian-SUITE: the image as qcow2, its kernel and
# initrd (direct kernel boot), and vagrant/box/Vagrantfile.
#   box.sh [DIR]   (DIR: build-image.sh's output, default vagrant/.cache/SUITE)
set -euo pipefail
cd "$(dirname "$0")/../.."
suite=${PORTRACE_VM_SUITE:-bookworm}
out=${1:-vagrant/.cache/$suite}
name=portrace/debian-$suite
rootfs="$out/rootfs"
[ -e "$rootfs/.portrace-built" ] || { echo "box: no image; run build-image.sh" >&2; exit 1; }
start=$(date +%s)
box="$out/box"
rm -rf "$box"
mkdir -p "$box"
size_gb=6
mkfs.ext4 -q -F -L portrace -d "$rootfs" "$box/root.ext4" "${size_gb}G" >/dev/null
qemu-img convert -O qcow2 "$box/root.ext4" "$box/box.img"
rm "$box/root.ext4"
cp "$out/vmlinuz" "$out/initrd.img" "$box/"
cp vagrant/box/Vagrantfile "$box/Vagrantfile"
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$size_gb" \
    > "$box/metadata.json"
tar -C "$box" -cf "$out/portrace-debian-$suite.box" metadata.json Vagrantfile box.img vmlinuz initrd.img
rm -rf "$box"
vagrant box add --force --name "$name" "$out/portrace-debian-$suite.box" >/dev/null
rm "$out/portrace-debian-$suite.box"
# vagrant-libvirt uploads a box's image into the storage pool once and then
# reuses it by name: drop the copy of the box this one replaces.
virsh -q vol-list --pool default 2>/dev/null | awk -v p="${name//\//-VAGRANTSLASH-}_vagrant_box_image" \
    'index($1, p) == 1 {print $1}' | while read -r vol; do
    virsh -q vol-delete --pool default "$vol" >/dev/null
done
echo "box: $name added in $(( $(date +%s) - start )) s"
