// cgroup bind4 programs that refuse every IPv4 bind() in the cgroup they are
// attached to (tests/test_refusals.py): one the kernel's default way (return
// 0: EPERM), one with its own errno (bpf_set_retval, 5.18+: EACCES).
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("cgroup/bind4")
int refuse_eperm(struct bpf_sock_addr *ctx)
{
	return 0;
}

SEC("cgroup/bind4")
int refuse_eacces(struct bpf_sock_addr *ctx)
{
	bpf_set_retval(-13);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
