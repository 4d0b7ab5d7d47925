// SPDX-License-Identifier: GPL-2.0
/*
 * portrace kernel side: tracepoints only, reading tracepoint arguments and
 * user memory only (no kernel struct offsets), so it is correct on any
 * kernel whose tracepoint formats bcc reads at load time.
 *
 *   syscalls:sys_{enter,exit}_socket      a socket's protocol, per (process, fd)
 *   syscalls:sys_{enter,exit}_setsockopt  SO_REUSEADDR/SO_REUSEPORT/IPV6_V6ONLY/
 *                                         SO_BINDTODEVICE, per (process, fd)
 *   syscalls:sys_{enter,exit}_accept{,4}  accepted sockets inherit the listener's
 *   syscalls:sys_{enter,exit}_close, _shutdown  forget an fd; hand its options
 *                                         to the transition the close causes
 *   syscalls:sys_{enter,exit}_bind        the address asked for, and the result
 *   syscalls:sys_{enter,exit}_listen      listen() failures (the port re-check)
 *   syscalls:sys_{enter,exit}_connect     EADDRNOTAVAIL: no local port left
 *   sock:inet_sock_set_state              transitions, and who closed a socket
 *
 * Filtering happens here, by the watched-port map, so an idle port costs
 * userspace nothing.
 */
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <linux/socket.h>
#include <linux/net.h>
#include "calls.h"

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

/* include/uapi/asm-generic/socket.h, include/uapi/linux/in6.h, errno.h */
#define PT_SOL_SOCKET 1
#define PT_SO_REUSEADDR 2
#define PT_SO_REUSEPORT 15
#define PT_SO_BINDTODEVICE 25
#define PT_SOL_IPV6 41
#define PT_IPV6_V6ONLY 26
#define PT_EADDRINUSE 98
#define PT_EADDRNOTAVAIL 99

#define PT_SOCK_TYPE_MASK 0xf	/* strips SOCK_NONBLOCK | SOCK_CLOEXEC */
#define PT_ALL_DEFAULT_OPTS (PT_OPT_REUSEADDR | PT_OPT_REUSEPORT | PT_OPT_BINDTODEVICE)

struct pt_socket_args {
	int family;
	int type;
	int protocol;
};

/* A syscall's arguments, kept from sys_enter_* to sys_exit_* per thread. */
struct pt_pending {
	int fd;
	__u8 opt;		/* setsockopt: the PT_OPT_* bit */
	__u8 on;		/* setsockopt: the value asked for */
	__u16 family;		/* bind/connect: from the sockaddr */
	__u16 port;
	__u8 addr[16];
};

#ifndef PT_WATCHED_MAX
#define PT_WATCHED_MAX 1024
#endif

BPF_RINGBUF_OUTPUT(events, PT_RINGBUF_PAGES);
/* Failures of a watched port have a ring of their own: a flood of
 * transitions, successes or host-wide noise cannot crowd them out. */
BPF_RINGBUF_OUTPUT(failures, 64);
BPF_PERCPU_ARRAY(lost, __u64, PT_LOST_SLOTS);	/* by PT_LOST_* */
BPF_HASH(port_rate, __u16, struct pt_rate, PT_WATCHED_MAX);
BPF_ARRAY(config, struct pt_config, 1);
BPF_HASH(watched_ports, __u16, __u8, PT_WATCHED_MAX);
/* Never read or written by the programs: its value type is the decoder's
 * layout of union pt_event (see portrace.h). */
BPF_ARRAY(pt_layout, union pt_event, 1);

BPF_HASH(socket_args, __u32, struct pt_socket_args, 10240);	/* by tid */
BPF_HASH(pending, __u32, struct pt_pending, 10240);		/* by tid */
/* Options of the socket a close()/shutdown() in progress acts on, by tid,
 * for the ESTABLISHED -> FIN_WAIT1 transition that syscall causes. */
BPF_HASH(closing, __u32, struct pt_opts, 10240);
BPF_TABLE("lru_hash", __u64, struct pt_sockinfo, sockinfo, 65536);	/* tgid<<32|fd */
BPF_TABLE("lru_hash", __u64, struct pt_task, owners, 65536);	/* by skaddr */
/* Who closed a connection first (ESTABLISHED -> FIN_WAIT1), keyed by its
 * 4-tuple: the TIME_WAIT / FIN_WAIT2 minisock it becomes is a new object,
 * so skaddr cannot find it, and sock_diag reports it by its 4-tuple. */
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

static __always_inline void count_lost(int slot)
{
	__u64 *n = lost.lookup(&slot);
	if (n)
		(*n)++;
}

static __always_inline __u32 cur_tid(void)
{
	return (__u32)bpf_get_current_pid_tgid();
}

static __always_inline __u64 fd_key(int fd)
{
	return (bpf_get_current_pid_tgid() & 0xffffffff00000000ULL) | (__u32)fd;
}

/* Keep a syscall's arguments from its sys_enter_* to its sys_exit_*. */
static __always_inline int stash(struct pt_pending *p)
{
	__u32 tid = cur_tid();
	pending.update(&tid, p);
	return 0;
}

static __always_inline int forget_closing(void)
{
	__u32 tid = cur_tid();
	closing.delete(&tid);
	return 0;
}



/* Emit a failed (or, for bind, successful) call on the socket at fd. */
/* Whether this failure is over its port's rate (calls.h: rate_spent). */
static __always_inline int over_rate(__u16 port)
{
	__u64 now = bpf_ktime_get_ns();
	struct pt_rate *r = port_rate.lookup(&port);
	if (!r) {
		struct pt_rate fresh = { .window_ns = now, .n = 1 };
		port_rate.insert(&port, &fresh);
		return 0;
	}
	return rate_spent(r, now);
}

static __always_inline void emit_call(__u8 kind, struct pt_pending *p, long ret,
				      struct pt_sockinfo *si)
{
	/* A failure on a watched port goes to its own ring; successes,
	 * autobind (port 0) failures and host-wide ones share the other. */
	struct pt_config *cfg = get_config();
	int own_ring = ret < 0 && p->port != 0 && cfg && !cfg->all_ports;
	if (own_ring && over_rate(p->port)) {
		count_lost(PT_LOST_LIMITED);
		return;
	}
	struct pt_call *e = own_ring ? failures.ringbuf_reserve(sizeof(union pt_event))
				     : events.ringbuf_reserve(sizeof(union pt_event));
	if (!e) {
		count_lost(own_ring ? PT_LOST_FAILURES : PT_LOST_EVENTS);
		return;
	}
	e->kind = kind;
	e->protocol = si ? si->protocol : 0;
	e->family = p->family;
	e->port = p->port;
	e->local_port = (kind == PT_CONNECT_ERROR && si) ? si->port : 0;
	e->fd = p->fd;
	e->err = ret < 0 ? -ret : 0;
	e->uid = (__u32)bpf_get_current_uid_gid();
	if (si)
		e->opts = si->opts;
	else
		__builtin_memset(&e->opts, 0, sizeof(e->opts));
	e->opts_source = e->opts.known ? PT_SRC_PROBES : PT_SRC_UNKNOWN;
	e->pad = 0;
	/* Kernel state this engine does not read (see core.bpf.c). */
	e->netns = 0;
	e->sk_uid = PT_UID_UNKNOWN;
	e->range_lo = 0;
	e->range_hi = 0;
	e->pad2 = 0;
	e->inode = 0;
	e->skaddr = 0;
	e->cgroup_id = bpf_get_current_cgroup_id();
	fill_task(&e->task);
	__builtin_memset(&e->task.opts, 0, sizeof(e->task.opts) + sizeof(e->task.pad));
	__builtin_memcpy(e->addr, p->addr, 16);
	events.ringbuf_submit(e, 0);
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
	__u32 tid = cur_tid();
	socket_args.update(&tid, &sa);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_socket)
{
	__u32 tid = cur_tid();
	struct pt_socket_args *sa = socket_args.lookup(&tid);
	if (!sa)
		return 0;
	__u8 proto = 0;
	if (sa->type == SOCK_STREAM && (sa->protocol == 0 || sa->protocol == IPPROTO_TCP))
		proto = IPPROTO_TCP;
	else if (sa->type == SOCK_DGRAM && (sa->protocol == 0 || sa->protocol == IPPROTO_UDP))
		proto = IPPROTO_UDP;
	socket_args.delete(&tid);
	if (args->ret < 0 || !proto)
		return 0;
	/* A new socket has every option off, but IPV6_V6ONLY, whose default
	 * is the namespace's net.ipv6.bindv6only. */
	struct pt_sockinfo si = {
		.protocol = proto,
		.opts = { .known = PT_ALL_DEFAULT_OPTS, .on = 0 },
	};
	__u64 key = fd_key(args->ret);
	sockinfo.update(&key, &si);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_setsockopt)
{
	struct pt_pending p = { .fd = args->fd };
	int level = args->level, name = args->optname;
	if (level == PT_SOL_SOCKET && name == PT_SO_REUSEADDR)
		p.opt = PT_OPT_REUSEADDR;
	else if (level == PT_SOL_SOCKET && name == PT_SO_REUSEPORT)
		p.opt = PT_OPT_REUSEPORT;
	else if (level == PT_SOL_SOCKET && name == PT_SO_BINDTODEVICE)
		p.opt = PT_OPT_BINDTODEVICE;
	else if (level == PT_SOL_IPV6 && name == PT_IPV6_V6ONLY)
		p.opt = PT_OPT_V6ONLY;
	else
		return 0;
	if (p.opt == PT_OPT_BINDTODEVICE) {
		/* A device name; an empty one unbinds. */
		char first = 0;
		if (args->optlen > 0 && bpf_probe_read_user(&first, 1, args->optval))
			return 0;
		p.on = first != 0;
	} else {
		int v = 0;
		if (args->optlen < (int)sizeof(v) ||
		    bpf_probe_read_user(&v, sizeof(v), args->optval))
			return 0;
		p.on = v != 0;
	}
	return stash(&p);
}

TRACEPOINT_PROBE(syscalls, sys_exit_setsockopt)
{
	__u32 tid = cur_tid();
	struct pt_pending *p = pending.lookup(&tid);
	if (!p)
		return 0;
	if (args->ret == 0) {
		__u64 key = fd_key(p->fd);
		struct pt_sockinfo fresh = {};
		struct pt_sockinfo *si = sockinfo.lookup_or_try_init(&key, &fresh);
		if (si) {
			si->opts.known |= p->opt;
			if (p->on)
				si->opts.on |= p->opt;
			else
				si->opts.on &= ~p->opt;
		}
	}
	pending.delete(&tid);
	return 0;
}

/* accept() and accept4(): the new socket is a clone of the listener
 * (sk_clone_lock copies sk_reuse, sk_reuseport, sk_bound_dev_if). */
static __always_inline int accept_enter(int fd)
{
	struct pt_pending p = { .fd = fd };
	return stash(&p);
}

static __always_inline int accept_exit(long ret)
{
	__u32 tid = cur_tid();
	struct pt_pending *p = pending.lookup(&tid);
	if (!p)
		return 0;
	if (ret >= 0) {
		__u64 lkey = fd_key(p->fd);
		struct pt_sockinfo *listener = sockinfo.lookup(&lkey);
		if (listener) {
			struct pt_sockinfo child = *listener;
			__u64 ckey = fd_key(ret);
			sockinfo.update(&ckey, &child);
		}
	}
	pending.delete(&tid);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept) { return accept_enter(args->fd); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { return accept_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_accept4) { return accept_enter(args->fd); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { return accept_exit(args->ret); }

static __always_inline void remember_closing(int fd)
{
	__u64 key = fd_key(fd);
	struct pt_sockinfo *si = sockinfo.lookup(&key);
	if (!si)
		return;
	struct pt_opts opts = si->opts;
	__u32 tid = cur_tid();
	closing.update(&tid, &opts);
}

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
	remember_closing(args->fd);
	/* A reused fd number must not inherit a closed socket's info. */
	__u64 key = fd_key(args->fd);
	sockinfo.delete(&key);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_close) { return forget_closing(); }

TRACEPOINT_PROBE(syscalls, sys_enter_shutdown)
{
	remember_closing(args->fd);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_shutdown) { return forget_closing(); }

TRACEPOINT_PROBE(syscalls, sys_enter_bind)
{
	struct pt_config *cfg = get_config();
	if (!cfg)
		return 0;
	/* Read the address from the caller's memory now: after a failed bind
	 * the kernel has reset the socket's port to 0. */
	struct pt_pending p = { .fd = args->fd };
	if (read_sockaddr(args->umyaddr, &p.family, &p.port, p.addr))
		return 0;
	/* Port 0 (autobind) is kept too: its failure is ephemeral exhaustion. */
	if (p.port != 0 && !port_watched(cfg, p.port))
		return 0;
	return stash(&p);
}

TRACEPOINT_PROBE(syscalls, sys_exit_bind)
{
	__u32 tid = cur_tid();
	struct pt_pending *p = pending.lookup(&tid);
	struct pt_config *cfg = get_config();
	if (!p || !cfg)
		return 0;
	long ret = args->ret;
	__u64 key = fd_key(p->fd);
	struct pt_sockinfo *si;
	if (ret == 0) {
		/* A socket older than the probes gets an entry too (options
		 * unknown), so a later listen() failure knows its address. */
		struct pt_sockinfo fresh = {};
		si = sockinfo.lookup_or_try_init(&key, &fresh);
		if (si) {
			si->family = p->family;
			si->port = p->port;
			__builtin_memcpy(si->addr, p->addr, 16);
		}
		/* Successes are streamed only for watched ports, so a tracer on
		 * every port sends userspace nothing but failures. */
		if (!cfg->all_ports && p->port != 0)
			emit_call(PT_BIND_OK, p, ret, si);
	} else if (ret == -PT_EADDRINUSE || ret == -PT_EADDRNOTAVAIL ||
		   (p->port != 0 && !cfg->all_ports)) {
		/* A watched port reports every errno (EACCES...); port 0, and
		 * every port host-wide, only the address-in-use class: an
		 * unprivileged EINVAL loop must not reach userspace. */
		si = sockinfo.lookup(&key);
		emit_call(PT_BIND_ERROR, p, ret, si);
	}
	pending.delete(&tid);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_listen)
{
	struct pt_pending p = { .fd = args->fd };
	return stash(&p);
}

TRACEPOINT_PROBE(syscalls, sys_exit_listen)
{
	__u32 tid = cur_tid();
	struct pt_pending *p = pending.lookup(&tid);
	struct pt_config *cfg = get_config();
	if (!p || !cfg)
		return 0;
	__u64 key = fd_key(p->fd);
	struct pt_sockinfo *si = sockinfo.lookup(&key);
	if (si) {
		p->family = si->family;
		p->port = si->port;
		__builtin_memcpy(p->addr, si->addr, 16);
	}
	if (args->ret < 0) {
		/* port 0: not seen bound, so listen() autobound (or the bind
		 * predates the probes); userspace tells which. */
		if (p->port == 0 || port_watched(cfg, p->port))
			emit_call(PT_LISTEN_ERROR, p, args->ret, si);
	} else if (!cfg->all_ports && p->port != 0 && port_watched(cfg, p->port)) {
		emit_call(PT_LISTEN_OK, p, 0, si);	/* recovery is visible */
	}
	pending.delete(&tid);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
	struct pt_config *cfg = get_config();
	if (!cfg)
		return 0;
	struct pt_pending p = { .fd = args->fd };
	if (read_sockaddr(args->uservaddr, &p.family, &p.port, p.addr) || !port_watched(cfg, p.port))
		return 0;
	return stash(&p);
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
	__u32 tid = cur_tid();
	struct pt_pending *p = pending.lookup(&tid);
	if (!p)
		return 0;
	long ret = args->ret;
	if (ret == -PT_EADDRNOTAVAIL || ret == -PT_EADDRINUSE) {
		__u64 key = fd_key(p->fd);
		emit_call(PT_CONNECT_ERROR, p, ret, sockinfo.lookup(&key));
	}
	pending.delete(&tid);
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

	/* These transitions are made by a syscall of the socket's owner
	 * (listen, connect, close/shutdown), so the task on the CPU is the
	 * owner. Every other transition may run in softirq, on any task. */
	if ((olds == PT_TCP_CLOSE && (news == PT_TCP_LISTEN || news == PT_TCP_SYN_SENT)) ||
	    (olds == PT_TCP_ESTABLISHED && news == PT_TCP_FIN_WAIT1) ||
	    (olds == PT_TCP_CLOSE_WAIT && news == PT_TCP_LAST_ACK)) {
		struct pt_task t = {};
		fill_task(&t);
		__u32 tid = t.tid;
		struct pt_opts *opts = closing.lookup(&tid);
		if (opts)
			t.opts = *opts;
		owners.update(&skaddr, &t);
		/* Who closes first owns the TIME_WAIT (or FIN_WAIT2) minisock this
		 * 4-tuple will become. Remember it now, in the closer's syscall:
		 * the FIN_WAIT2/CLOSING -> CLOSE that makes the minisock
		 * (tcp_time_wait() ends with tcp_done()) often runs in softirq,
		 * and the kernel skips a tracepoint program there whenever any
		 * BPF program was running on that CPU (kernel/trace/bpf_trace.c:
		 * trace_call_bpf, bpf_prog_active). */
		if (news == PT_TCP_FIN_WAIT1)
			closers.update(&tuple, &t);
	}

	struct pt_task *owner = owners.lookup(&skaddr);
	if (!cfg->all_ports) {
		struct pt_state *e = events.ringbuf_reserve(sizeof(union pt_event));
		if (e) {
			e->kind = PT_STATE;
			e->pad = 0;
			e->protocol = args->protocol;
			e->oldstate = olds;
			e->newstate = news;
			e->pad2 = 0;
			e->ts_ns = bpf_ktime_get_ns();
			e->skaddr = skaddr;
			e->tuple = tuple;
			if (owner)
				e->owner = *owner;
			else
				__builtin_memset(&e->owner, 0, sizeof(e->owner));
			events.ringbuf_submit(e, 0);
		} else {
			count_lost(PT_LOST_EVENTS);
		}
	}
	if (news == PT_TCP_CLOSE)
		owners.delete(&skaddr);
	return 0;
}
