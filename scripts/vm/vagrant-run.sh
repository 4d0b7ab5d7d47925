#!/usr/bin/env bash
# The VM test's flow, as a user runs the Vagrantfile, offline: make the box
# from build-image.sh's image (box.sh), then for each sysctl file
# `vagrant up` its VM from vagrant/Vagrantfile (provisioned by
# vagrant/provision.sh, i.e. the README's `make setup`), run validate-sysctl.sh
# for that file through `vagrant ssh`, copy the results back, and
# `vagrant destroy -f`. The first VM also runs `portrace demo` on both engines
# and a lab comparison. Output on stdout; sections are marked "=== NAME",
# each followed by "=== NAME-exit N" and "=== NAME-seconds N".
#   vagrant-run.sh [DIR]   (DIR: build-image.sh's output, default vagrant/.cache/SUITE;
#                          results come back to DIR/results/FILE/)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
suite=${PORTRACE_VM_SUITE:-bookworm}
out=$(realpath -m "${1:-vagrant/.cache/$suite}")
files=(vagrant/sysctl/fin-timeout.conf vagrant/sysctl/tw-reuse.conf)
export PORTRACE_BOX="portrace/debian-$suite" PORTRACE_SYSCTL_FILES="${files[*]}"
export VAGRANT_DOTFILE_PATH="$out/vagrant-state" VAGRANT_NO_COLOR=1
mkdir -p "$out/results"

# One step: its output (vagrant's upload progress bar dropped), exit status and seconds.
step() {
    local name=$1 start rc
    shift
    echo "=== $name"
    start=$(date +%s)
    "$@" 2>&1 | tr '\r' '\n' | grep -v -e 'Progress: [0-9]*%' -e '^\s*$'
    rc=${PIPESTATUS[0]}
    echo "=== $name-exit $rc"
    echo "=== $name-seconds $(( $(date +%s) - start ))"
    return "$rc"
}
in_vagrant() { (cd vagrant && "$@"); }
on() { local vm=$1; shift; in_vagrant vagrant ssh "$vm" --no-tty -c "$*"; }
fetch_results() {
    rm -rf "${out:?}/results/$1"
    on "$1" "sudo tar -C /vagrant/vagrant/results -cf - $1" | tar -xf - -C "$out/results"
}

step libvirt bash scripts/vm/libvirt.sh || exit 1
step box bash scripts/vm/box.sh "$out" || exit 1
# An earlier run's VMs, if it was cut short: known to its state directory, or
# only to libvirt (vagrant-libvirt names a domain <project dir>_<machine>).
in_vagrant vagrant destroy -f >/dev/null 2>&1
for file in "${files[@]}"; do
    domain=vagrant_$(basename "$file" .conf)
    virsh -q destroy "$domain" >/dev/null 2>&1
    virsh -q undefine "$domain" >/dev/null 2>&1 && echo "removed a stale domain $domain"
    virsh -q vol-delete --pool default "$domain.img" >/dev/null 2>&1
done
first=1
for file in "${files[@]}"; do
    vm=$(basename "$file" .conf)
    if step "up-$vm" in_vagrant vagrant up --provider=libvirt "$vm"; then
        # shellcheck disable=SC2016
        step "kernel-$vm" on "$vm" 'echo "kernel $(uname -r) headers $(readlink -f /lib/modules/$(uname -r)/build)"'
        if [ "$first" = 1 ]; then
            step demo on "$vm" "cd /vagrant && sudo .venv/bin/portrace demo"
            step demo-bcc on "$vm" "cd /vagrant && sudo .venv/bin/portrace demo --engine bcc"
            step lab-json on "$vm" "cd /vagrant && sudo .venv/bin/portrace lab restart-timewait" \
                "connect-exhaustion --compare net.ipv4.tcp_tw_reuse=0,1 --within 4 --json"
        fi
        step "validate-$vm" on "$vm" "sudo bash /vagrant/vagrant/validate-sysctl.sh /vagrant/$file"
        step "results-$vm" fetch_results "$vm"
    fi
    step "destroy-$vm" in_vagrant vagrant destroy -f "$vm"
    first=0
done
echo "=== done"
