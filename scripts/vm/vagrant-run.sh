#!/usr/bin/env bash
# The VM test's flow, as a user runs the Vagrantfile, offline: make the box
# from build-image.sh's image (box.sh), `vagrant up` one VM from
# vagrant/Vagrantfile (provisioned by vagrant/provision.sh, i.e. the README's
# `make setup`), run `portrace demo` on both engines, the CO-RE engine's port
# lookup (scripts/vm/lookup.py), the recorder's systemd unit run by systemd
# as a user of its own (scripts/vm/unit.sh) and a lab comparison, then
# validate-sysctl.sh for each sysctl file in turn through `vagrant ssh`, each
# file's changes put back before the next (PORTRACE_RESTORE=1), copy the
# results back, and `vagrant destroy -f`. One VM for all files, not one each as
# the Vagrantfile offers: a `vagrant up` costs 3.5-5 min under TCG and proves
# nothing new the second time. Output on stdout; sections are marked "=== NAME",
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
# ssh to VM $1 as `vagrant ssh` does (its ssh-config), with ssh's own errors shown.
vm_ssh() { local vm=$1; shift; ssh -F "$out/ssh-config-$vm" -o LogLevel=ERROR -T "$vm" "$@"; }
ssh_port() { sed -n 's/^ *Port //p' "$out/ssh-config-$1"; }
# The first line sshd says on a bare TCP connection (its banner, or its refusal).
first_line() { timeout "$2" bash -c "exec 3<>/dev/tcp/127.0.0.1/$1 && head -1 <&3" 2>&1 | tr -d '\r'; }
# Why ssh to a VM failed, as far as the host can see: the domain's state, QEMU's
# port forward, and what sshd answers on it (one that penalises the host says
# "Not allowed at this time" instead of its banner).
why_no_ssh() {
    local vm=$1 port banner
    port=$(ssh_port "$vm")
    echo "ssh: $vm: domain $(virsh -q domstate --reason "vagrant_$vm" 2>&1 | head -1)"
    if ! ss -Hltn "sport = :$port" | grep -q .; then
        echo "ssh: $vm: nothing listens on 127.0.0.1:$port (QEMU's forward is gone)"
        return 0
    fi
    banner=$(first_line "$port" 10)
    case $banner in
        SSH-*) banner="answered \"$banner\"" ;;
        "Not allowed at this time")  # sshd's refusal text, before any banner
            banner="refused the host: \"$banner\" (PerSourcePenalties or MaxStartups)" ;;
        "") banner="closed the connection without a word" ;;
        *) banner="said \"$banner\"" ;;
    esac
    echo "ssh: $vm: QEMU forwards 127.0.0.1:$port; sshd $banner"
}
# A command in VM $1 over ssh (the address and key `vagrant ssh` uses), told why
# when ssh fails. Only a failure to connect, before the command could start, is
# retried: three tries, 10 s apart, each said.
on() {
    local vm=$1 try err rc
    shift
    err=$(mktemp)
    for try in 1 2 3; do
        vm_ssh "$vm" "$*" 2>"$err"
        rc=$?
        cat "$err" >&2
        [ "$rc" -eq 255 ] || break
        why_no_ssh "$vm" >&2
        grep -q -E 'kex_exchange_identification|Connection (refused|timed out)|banner exchange|Connection (closed|reset) by [^ ]+ port' "$err" ||
            break
        [ "$try" -lt 3 ] && echo "ssh: $vm: could not connect (try $try of 3); again in 10 s" >&2 && sleep 10
    done
    rm -f "$err"
    [ "$rc" -ne 255 ] || echo "ssh: $vm: gave up after try $try: ssh exited 255" >&2
    return "$rc"
}
# The box's exemption from sshd's per-source penalties (build-image.sh), proved
# each run: 40 connections closed before authenticating (1 s "noauth" penalty
# each from OpenSSH 9.8 on, enforced from 15 s; 20 were not always enough),
# then one ssh, not retried.
penalty_guard() {
    local vm=$1 port
    port=$(ssh_port "$vm")
    for _ in $(seq 40); do
        first_line "$port" 5 >/dev/null
    done
    sleep 2  # sshd penalises when it reaps a connection's process
    # shellcheck disable=SC2016  # the guest's shell expands it
    vm_ssh "$vm" \
        'echo "ssh after 40 unauthenticated connections: ok ($(/usr/sbin/sshd -V 2>&1 | head -1))"' || {
        why_no_ssh "$vm"
        return 1
    }
}
# VM $1's results for sysctl file $2 (its name without .conf), into $out/results/$2/.
fetch_results() {
    rm -rf "${out:?}/results/$2"
    on "$1" "sudo tar -C /vagrant/vagrant/results -cf - $2" | tar -xf - -C "$out/results"
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
vm=$(basename "${files[0]}" .conf)  # the Vagrantfile's name for the first file's VM
if step "up-$vm" in_vagrant vagrant up --provider=libvirt "$vm" &&
    in_vagrant vagrant ssh-config "$vm" > "$out/ssh-config-$vm"; then
    # shellcheck disable=SC2016
    step kernel on "$vm" 'echo "kernel $(uname -r) headers $(readlink -f /lib/modules/$(uname -r)/build)"'
    step ssh-penalty penalty_guard "$vm"
    step demo on "$vm" "cd /vagrant && sudo .venv/bin/portrace demo"
    step demo-bcc on "$vm" "cd /vagrant && sudo .venv/bin/portrace demo --engine bcc"
    step lookup on "$vm" "cd /vagrant && sudo .venv/bin/python scripts/vm/lookup.py"
    step unit on "$vm" "sudo bash /vagrant/scripts/vm/unit.sh"
    step lab-json on "$vm" "cd /vagrant && sudo .venv/bin/portrace lab restart-timewait" \
        "connect-exhaustion --compare net.ipv4.tcp_tw_reuse=0,1 --within 4 --json"
    for file in "${files[@]}"; do
        name=$(basename "$file" .conf)
        step "validate-$name" on "$vm" \
            "sudo env PORTRACE_RESTORE=1 bash /vagrant/vagrant/validate-sysctl.sh /vagrant/$file"
        step "results-$name" fetch_results "$vm" "$name"
    done
    # sshd's own record of what it refused or timed out (the guest's view).
    step sshd-log on "$vm" "sudo journalctl -u ssh -o short-monotonic --no-pager" \
        "| grep -E 'drop connection|Timeout before authentication|penalt' || true"
fi
step destroy in_vagrant vagrant destroy -f "$vm"
echo "=== done"
