// SPDX-License-Identifier: GPL-2.0
/*
 * portrace kernel side: tracepoints only, reading tracepoint arguments and
 * user memory only (no kernel struct offsets), so it is correct on any
 * kernel whose tracepoint formats bcc reads at load time.
 *
 *   syscalls:sys_{enter,exit}_socket  protocol of each (process, fd)
 *   syscalls:sys_enter_close          forget a closed fd
 *   syscalls:sys_{enter,exit}_bind    the address asked for, and the result
 *   sock:inet_sock_set_state          transitions, and who closed a socket
 *
 * Filtering happens here, by the watched-port map, so an idle port costs
 * userspace nothing.
 */
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <linux/socket.h>
#include <linux/net.h>
#include "portrace.h"

#ifndef PT_RINGBUF_PAGES
#define PT_RINGBUF_PAGES 64
#endif

/* include/net/tcp_states.h; kept here so no kernel header is trusted. */
#define PT_TCP_ESTABLISHED 1
#define PT_TCP_SYN_SENT 2
#define PT_TCP_FIN_WAIT1 4
#define PT_TCP_FIN_WAIT2 5
#define PT_TCP_CLOSE 7
#define PT_TCP_CLOSE_WAIT 8
#define PT_TCP_LAST_ACK 9
#define PT_TCP_LISTEN 10
#define PT_TCP_CLOSING 11

#define PT_SOCK_TYPE_MASK 0xf	/* strips SOCK_NONBLOCK | SOCK_CLOEXEC */

struct pt_socket_args {
	int family;
	int type;
	int protocol;
};

struct pt_bind_args {
	int fd;
	__u16 family;
	__u16 port;
	__u8 addr[16];
};

BPF_RINGBUF_OUTPUT(events, PT_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost, __u64, 1);
BPF_ARRAY(config, struct pt_config, 1);
BPF_HASH(watched_ports, __u16, __u8, 1024);
/* Never read or written by the programs: its value type is the decoder's
 * layout of union pt_event (see portrace.h). */
BPF_ARRAY(pt_layout, union pt_event, 1);

BPF_HASH(socket_args, __u32, struct pt_socket_args, 10240);	/* by tid */
BPF_TABLE("lru_hash", __u64, __u8, sock_proto, 65536);	/* tgid<<32|fd */
BPF_HASH(bind_args, __u32, struct pt_bind_args, 10240);		/* by tid */
BPF_TABLE("lru_hash", __u64, struct pt_task, owners, 65536);	/* by skaddr */
/* Who closed a socket that became a TIME_WAIT / FIN_WAIT2 minisock, keyed
 * by its 4-tuple: the minisock is a new object, so skaddr cannot find it,
 * and sock_diag reports the minisock by its 4-tuple. */
BPF_TABLE("lru_hash", struct pt_tuple, struct pt_task, closers, 65536);

static __always_inline struct pt_config *get_config(void)
{
	int zero = 0;
	return config.lookup(&zero);
}

static __always_inline int port_watched(struct pt_config *cfg, __u16 port)
{
	if (cfg->all_ports)
		return 1;
	return watched_ports.lookup(&port) != NULL;
}

static __always_inline void count_lost(void)
{
	int zero = 0;
	__u64 *n = lost.lookup(&zero);
	if (n)
		(*n)++;
}

static __always_inline void fill_task(struct pt_task *t)
{
	__u64 id = bpf_get_current_pid_tgid();
	t->ts_ns = bpf_ktime_get_ns();
	t->pid = id >> 32;
	t->tid = (__u32)id;
	bpf_get_current_comm(&t->comm, sizeof(t->comm));
}

TRACEPOINT_PROBE(syscalls, sys_enter_socket)
{
	if (args->family != AF_INET && args->family != AF_INET6)
		return 0;
	struct pt_socket_args sa = {
		.family = args->family,
		.type = args->type & PT_SOCK_TYPE_MASK,
		.protocol = args->protocol,
	};
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	socket_args.update(&tid, &sa);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_socket)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;
	struct pt_socket_args *sa = socket_args.lookup(&tid);
	if (!sa)
		return 0;
	__u8 proto = 0;
	if (sa->type == SOCK_STREAM &&
	    (sa->protocol == 0 || sa->protocol == IPPROTO_TCP))
		proto = IPPROTO_TCP;
	else if (sa->type == SOCK_DGRAM &&
		 (sa->protocol == 0 || sa->protocol == IPPROTO_UDP))
		proto = IPPROTO_UDP;
	socket_args.delete(&tid);
	if (args->ret < 0 || !proto)
		return 0;
	__u64 key = (id & 0xffffffff00000000ULL) | (__u32)args->ret;
	sock_proto.update(&key, &proto);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
	/* A reused fd number must not inherit a closed socket's protocol. */
	__u64 key = (bpf_get_current_pid_tgid() & 0xffffffff00000000ULL) |
		    (__u32)args->fd;
	sock_proto.delete(&key);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_bind)
{
	struct pt_config *cfg = get_config();
	if (!cfg)
		return 0;
	/* Read the address from the caller's memory now: after a failed bind
	 * the kernel has reset the socket's port to 0. sockaddr_in first, so
	 * a short IPv4 buffer at a page end is not over-read. */
	struct sockaddr_in6 sa = {};
	if (bpf_probe_read_user(&sa, sizeof(struct sockaddr_in), args->umyaddr))
		return 0;
	if (sa.sin6_family == AF_INET6 &&
	    bpf_probe_read_user(&sa, sizeof(sa), args->umyaddr))
		return 0;
	if (sa.sin6_family != AF_INET && sa.sin6_family != AF_INET6)
		return 0;

	struct pt_bind_args ba = {
		.fd = args->fd,
		.family = sa.sin6_family,
		.port = bpf_ntohs(sa.sin6_port),
	};
	if (!port_watched(cfg, ba.port))
		return 0;
	if (ba.family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)&sa;
		__builtin_memcpy(ba.addr, &sin->sin_addr, 4);
	} else {
		__builtin_memcpy(ba.addr, &sa.sin6_addr, 16);
	}
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	bind_args.update(&tid, &ba);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_bind)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;
	struct pt_bind_args *ba = bind_args.lookup(&tid);
	if (!ba)
		return 0;
	struct pt_config *cfg = get_config();
	long ret = args->ret;
	/* Successes are streamed only for watched ports, so a tracer on every
	 * port sends userspace nothing but failures. */
	if (!cfg || (ret == 0 && cfg->all_ports)) {
		bind_args.delete(&tid);
		return 0;
	}
	struct pt_bind *e = events.ringbuf_reserve(sizeof(union pt_event));
	if (!e) {
		count_lost();
		bind_args.delete(&tid);
		return 0;
	}
	__u64 key = (id & 0xffffffff00000000ULL) | (__u32)ba->fd;
	__u8 *proto = sock_proto.lookup(&key);
	e->kind = ret < 0 ? PT_BIND_ERROR : PT_BIND_OK;
	e->protocol = proto ? *proto : 0;
	e->family = ba->family;
	e->port = ba->port;
	e->fd = ba->fd;
	e->err = ret < 0 ? -ret : 0;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->cgroup_id = bpf_get_current_cgroup_id();
	fill_task(&e->task);
	__builtin_memcpy(e->addr, ba->addr, 16);
	events.ringbuf_submit(e, 0);
	bind_args.delete(&tid);
	return 0;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->protocol != IPPROTO_TCP)
		return 0;
	struct pt_config *cfg = get_config();
	if (!cfg || !port_watched(cfg, args->sport))
		return 0;

	int olds = args->oldstate, news = args->newstate;
	__u64 skaddr = (__u64)args->skaddr;

	/* These transitions are made by a syscall of the socket's owner
	 * (listen, connect, close/shutdown), so the task on the CPU is the
	 * owner. Every other transition may run in softirq, on any task. */
	if ((olds == PT_TCP_CLOSE && (news == PT_TCP_LISTEN || news == PT_TCP_SYN_SENT)) ||
	    (olds == PT_TCP_ESTABLISHED && news == PT_TCP_FIN_WAIT1) ||
	    (olds == PT_TCP_CLOSE_WAIT && news == PT_TCP_LAST_ACK)) {
		struct pt_task t = {};
		fill_task(&t);
		owners.update(&skaddr, &t);
	}

	struct pt_tuple tuple = {
		.family = args->family,
		.sport = args->sport,
		.dport = args->dport,
	};
	if (args->family == AF_INET) {
		__builtin_memcpy(tuple.saddr, args->saddr, 4);
		__builtin_memcpy(tuple.daddr, args->daddr, 4);
	} else {
		__builtin_memcpy(tuple.saddr, args->saddr_v6, 16);
		__builtin_memcpy(tuple.daddr, args->daddr_v6, 16);
	}

	struct pt_task *owner = owners.lookup(&skaddr);
	/* FIN_WAIT2 -> CLOSE and CLOSING -> CLOSE are how entering TIME_WAIT
	 * (or an orphaned FIN_WAIT2 minisock) shows: tcp_time_wait() ends with
	 * tcp_done(). Remember the closer under the minisock's 4-tuple. */
	if (news == PT_TCP_CLOSE && owner &&
	    (olds == PT_TCP_FIN_WAIT2 || olds == PT_TCP_CLOSING))
		closers.update(&tuple, owner);

	if (!cfg->all_ports) {
		struct pt_state *e = events.ringbuf_reserve(sizeof(union pt_event));
		if (e) {
			e->kind = PT_STATE;
			e->protocol = args->protocol;
			e->oldstate = olds;
			e->newstate = news;
			e->ts_ns = bpf_ktime_get_ns();
			e->skaddr = skaddr;
			e->tuple = tuple;
			if (owner)
				e->owner = *owner;
			else
				__builtin_memset(&e->owner, 0, sizeof(e->owner));
			events.ringbuf_submit(e, 0);
		} else {
			count_lost();
		}
	}
	if (news == PT_TCP_CLOSE)
		owners.delete(&skaddr);
	return 0;
}
