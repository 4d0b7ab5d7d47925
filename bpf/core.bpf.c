// SPDX-License-Identifier: GPL-2.0
/*
 * portrace kernel side for the libbpf CO-RE engine: compiled once at build
 * time (make setup, the wheel), relocated against /sys/kernel/btf/vmlinux at
 * load. It reads the kernel's own state instead of rebuilding it from
 * syscalls:
 *
 *   syscalls:sys_{enter,exit}_bind     the address asked for (user memory, at
 *                                      entry: a failed bind resets the port);
 *                                      at exit the socket itself, through the fd
 *   syscalls:sys_{enter,exit}_listen   the socket's bound address and options
 *   syscalls:sys_{enter,exit}_connect  EADDRNOTAVAIL/EADDRINUSE to a watched port
 *   sock:inet_sock_set_state (tp_btf)  who acted on a socket (process context),
 *                                      who closed a minisock, recent transitions
 *   iter/tcp, iter/udp                 the sockets of a port, minisocks with their
 *                                      own flags and timers (per netns)
 *   iter/task_file                     who holds them, bound-only sockets too
 *
 * No probe fires on socket(), setsockopt(), accept() or close(): their state
 * is read from the socket when it matters. Hot paths test the errno and the
 * port before touching any map.
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>
#include "portrace.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define EADDRINUSE 98
#define EADDRNOTAVAIL 99

#include "calls.h"

/* include/net/tcp_states.h */
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_FIN_WAIT1 4
#define TCP_FIN_WAIT2 5
#define TCP_TIME_WAIT 6
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define TCP_LAST_ACK 9
#define TCP_LISTEN 10
#define TCP_CLOSING 11
#define TCP_NEW_SYN_RECV 12

/* Settings, fixed before load (libbpf-tools style). */
const volatile __u8 all_ports = 0;	/* 1: every port, failures only */
const volatile __u8 stream_states = 0;	/* 1: transitions reach userspace (--states) */

extern int CONFIG_HZ __kconfig __weak;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* Failures of a watched port have a ring of their own: a flood of
 * transitions, successes or host-wide noise cannot crowd them out. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} failures SEC(".maps");

/* Records not sent, by PT_LOST_* slot. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PT_LOST_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);	/* resized to the watched ports before load */
	__type(key, __u16);
	__type(value, struct pt_rate);
} port_rate SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);	/* resized to the watched ports before load */
	__type(key, __u16);
	__type(value, __u8);
} watched_ports SEC(".maps");

/* A syscall's arguments, kept from sys_enter_* to sys_exit_* per thread. */
struct pt_pending {
	int fd;
	__u16 family;
	__u16 port;
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u32);	/* tid */
	__type(value, struct pt_pending);
} pending SEC(".maps");

/* The process last seen acting on a socket from a syscall, by struct sock
 * address: bind() or listen() (who owns it) and close() (who closed it). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);	/* per-CPU LRU lists: no shared lock */
	__type(key, __u64);
	__type(value, struct pt_task);
} owners SEC(".maps");

/* Who closed a socket that became a TIME_WAIT / FIN_WAIT2 minisock, by its
 * 4-tuple: the minisock is a new object, so skaddr cannot find it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__type(key, struct pt_tuple);
	__type(value, struct pt_task);
} closers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);	/* resized to the watched ports before load */
	__type(key, __u16);
	__type(value, struct pt_recent);
} recent SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pt_query);
} query SEC(".maps");

/* Never used by a program: keeps the records' types in the object's BTF,
 * where the frontend reads their layout. */
union pt_event pt_event_layout;
struct pt_sock pt_sock_layout;

static __always_inline bool watched(__u16 port)
{
	return all_ports || bpf_map_lookup_elem(&watched_ports, &port);
}

static __always_inline void count_lost(__u32 slot)
{
	__u64 *n = bpf_map_lookup_elem(&lost, &slot);
	if (n)
		(*n)++;
}

static __always_inline __u32 cur_tid(void)
{
	return (__u32)bpf_get_current_pid_tgid();
}



/* The struct sock behind the current task's fd, NULL if it is no socket. */
static __always_inline struct sock *fd_sock(int fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	unsigned int max = BPF_CORE_READ(fdt, max_fds);
	struct file *f = NULL;
	if (fd < 0 || (unsigned int)fd >= max)
		return NULL;
	bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]);
	if (!f || (BPF_CORE_READ(f, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return NULL;
	struct socket *so = BPF_CORE_READ(f, private_data);
	return BPF_CORE_READ(so, sk);
}

static __always_inline __u32 current_netns(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	return BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);
}

/* SO_REUSEADDR, SO_REUSEPORT, IPV6_V6ONLY, SO_BINDTODEVICE as the socket has them. */
static __always_inline __u8 sock_opts(const struct sock_common *skc)
{
	__u8 on = 0;
	if (BPF_CORE_READ_BITFIELD_PROBED(skc, skc_reuse))
		on |= PT_OPT_REUSEADDR;
	if (BPF_CORE_READ_BITFIELD_PROBED(skc, skc_reuseport))
		on |= PT_OPT_REUSEPORT;
	if (BPF_CORE_READ_BITFIELD_PROBED(skc, skc_ipv6only))
		on |= PT_OPT_V6ONLY;
	if (BPF_CORE_READ(skc, skc_bound_dev_if))
		on |= PT_OPT_BINDTODEVICE;
	return on;
}

static __always_inline __u64 sock_inode(struct sock *sk)
{
	return BPF_CORE_READ(sk, sk_socket, file, f_inode, i_ino);
}

static __always_inline void read_local(const struct sock_common *skc, __u16 family, __u8 *addr)
{
	if (family == AF_INET6)
		bpf_probe_read_kernel(addr, 16, &skc->skc_v6_rcv_saddr);
	else
		bpf_probe_read_kernel(addr, 4, &skc->skc_rcv_saddr);
}

/* Whether this failure is over its port's rate (calls.h: rate_spent). */
static __always_inline bool over_rate(__u16 port)
{
	__u64 now = bpf_ktime_get_ns();
	struct pt_rate *r = bpf_map_lookup_elem(&port_rate, &port);
	if (!r) {
		struct pt_rate fresh = { .window_ns = now, .n = 1 };
		bpf_map_update_elem(&port_rate, &port, &fresh, BPF_NOEXIST);
		return false;
	}
	return rate_spent(r, now);
}

/* Emit a bind(), listen() or connect() result with what the socket says. */
static __always_inline void emit_call(__u8 kind, struct pt_pending *p, long ret, struct sock *sk)
{
	/* A failure on a watched port goes to its own ring, within the
	 * port's rate; successes, autobind (port 0) failures and host-wide
	 * ones share the other. */
	bool own_ring = ret < 0 && p->port != 0 && !all_ports;
	if (own_ring && over_rate(p->port)) {
		count_lost(PT_LOST_LIMITED);
		return;
	}
	struct pt_call *e = own_ring
		? bpf_ringbuf_reserve(&failures, sizeof(union pt_event), 0)
		: bpf_ringbuf_reserve(&events, sizeof(union pt_event), 0);
	if (!e) {
		count_lost(own_ring ? PT_LOST_FAILURES : PT_LOST_EVENTS);
		return;
	}
	__builtin_memset(e, 0, sizeof(union pt_event));
	e->kind = kind;
	e->family = p->family;
	e->port = p->port;
	e->fd = p->fd;
	e->err = ret < 0 ? -ret : 0;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->netns = current_netns();
	e->sk_uid = PT_UID_UNKNOWN;
	fill_task(&e->task);
	__builtin_memcpy(e->addr, p->addr, 16);
	if (sk) {
		struct sock_common *skc = &sk->__sk_common;
		__u16 proto = BPF_CORE_READ(sk, sk_protocol);
		e->protocol = proto == IPPROTO_TCP || proto == IPPROTO_UDP ? proto : 0;
		e->opts.known = PT_OPT_REUSEADDR | PT_OPT_REUSEPORT | PT_OPT_V6ONLY |
				PT_OPT_BINDTODEVICE;
		e->opts.on = sock_opts(skc);
		e->opts_source = PT_SRC_KERNEL;
		e->sk_uid = BPF_CORE_READ(sk, sk_uid.val);
		e->inode = sock_inode(sk);
		e->skaddr = (__u64)sk;
		if (kind == PT_CONNECT_ERROR)
			e->local_port = BPF_CORE_READ(skc, skc_num);
		if (bpf_core_field_exists(((struct inet_sock *)sk)->local_port_range)) {
			__u32 range = BPF_CORE_READ((struct inet_sock *)sk, local_port_range);
			e->range_lo = range & 0xffff;
			e->range_hi = range >> 16;
		}
	}
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int stash(struct pt_pending *p)
{
	__u32 tid = cur_tid();
	bpf_map_update_elem(&pending, &tid, p, BPF_ANY);
	return 0;
}

/* Remember who bound or listened on a socket of a watched port. */
static __always_inline void remember_owner(struct sock *sk)
{
	struct pt_task t = {};
	__u64 key = (__u64)sk;
	fill_task(&t);
	bpf_map_update_elem(&owners, &key, &t, BPF_ANY);
}

/* -- bind(), listen(), connect() ------------------------------------------
 *
 * Each call is seen either through its syscall tracepoints (enter keeps the
 * arguments per thread, exit judges), or, where the kernel has BPF
 * trampolines, through one fexit program on the syscall's body, which has
 * the arguments and the result at once. Attached syscall tracepoints put
 * every syscall of every process on the tracepoint slow path
 * (SYSCALL_WORK_SYSCALL_TRACEPOINT, set on every task); fexit costs only the
 * three calls it is on. The frontend attaches one set (kernel/core.py). */

/* Whether a bind() to this port is worth following: a watched port, or port
 * 0 (autobind), whose failure is ephemeral exhaustion. */
static __always_inline bool bind_followed(struct pt_pending *p)
{
	return p->port == 0 || watched(p->port);
}

static __always_inline void bind_done(struct pt_pending *p, long ret)
{
	if (ret == 0) {
		if (p->port != 0) {
			struct sock *sk = fd_sock(p->fd);
			if (sk)
				remember_owner(sk);
			/* Successes are streamed only for watched ports, so a tracer
			 * on every port sends userspace nothing but failures. */
			if (!all_ports)
				emit_call(PT_BIND_OK, p, 0, sk);
		}
	} else if (ret == -EADDRINUSE || ret == -EADDRNOTAVAIL || (p->port != 0 && !all_ports)) {
		/* A watched port reports every errno (EACCES...); port 0, and
		 * every port host-wide, only the address-in-use class: an
		 * unprivileged EINVAL loop must not reach userspace. */
		emit_call(PT_BIND_ERROR, p, ret, fd_sock(p->fd));
	}
}

/* listen() keeps its port after a failure (inet_csk_listen_start only resets
 * the state); port 0: unbound, and listen() could not autobind. */
static __always_inline void listen_done(struct pt_pending *p, long ret)
{
	struct sock *sk = NULL;
	/* Only EADDRINUSE leaves the kernel from a failure; a success only
	 * for a watched port. */
	if (ret == -EADDRINUSE || (ret == 0 && !all_ports))
		sk = fd_sock(p->fd);
	if (!sk)
		return;
	struct sock_common *skc = &sk->__sk_common;
	p->family = BPF_CORE_READ(skc, skc_family);
	p->port = BPF_CORE_READ(skc, skc_num);
	read_local(skc, p->family, p->addr);
	if (ret < 0 && (p->port == 0 || watched(p->port)))
		emit_call(PT_LISTEN_ERROR, p, ret, sk);
	else if (ret == 0 && p->port != 0 && watched(p->port))
		emit_call(PT_LISTEN_OK, p, 0, sk);	/* recovery is visible */
}

static __always_inline void connect_done(struct pt_pending *p, long ret)
{
	if (ret == -EADDRNOTAVAIL || ret == -EADDRINUSE)
		emit_call(PT_CONNECT_ERROR, p, ret, fd_sock(p->fd));
}

/* The arguments the enter tracepoint kept for this thread, then dropped. */
static __always_inline struct pt_pending *kept(__u32 *tid)
{
	*tid = cur_tid();
	return bpf_map_lookup_elem(&pending, tid);
}

/* A socket's port before listen(): 0 (unbound, listen() will autobind) or a
 * watched one is followed. */
static __always_inline bool listen_followed(int fd)
{
	struct sock *sk = fd_sock(fd);
	__u16 port = sk ? BPF_CORE_READ(sk, __sk_common.skc_num) : 0;
	return port == 0 || watched(port);
}

/* First in the object: where the kernel refuses them, the load fails before
 * the other programs are verified, and is retried without them.
 *
 * fexit on net/socket.c's __sys_bind, __sys_listen and __sys_connect (the
 * syscalls' bodies; io_uring's bind/listen/connect bypass them, as they
 * bypass the syscall tracepoints). The caller's sockaddr is read at exit: a
 * failed bind() resets the socket's port, never the caller's buffer. */
SEC("fexit/__sys_bind")
int BPF_PROG(bind_fexit, int fd, void *uaddr, int addrlen, int ret)
{
	struct pt_pending p = { .fd = fd };
	if (read_sockaddr(uaddr, &p.family, &p.port, p.addr) || !bind_followed(&p))
		return 0;
	bind_done(&p, ret);
	return 0;
}

/* At exit the socket has its port whatever listen() did; a port that was 0
 * before and autobound now is followed if watched, as at exit above. */
SEC("fexit/__sys_listen")
int BPF_PROG(listen_fexit, int fd, int backlog, int ret)
{
	struct pt_pending p = { .fd = fd };
	if (!listen_followed(fd))
		return 0;
	listen_done(&p, ret);
	return 0;
}

SEC("fexit/__sys_connect")
int BPF_PROG(connect_fexit, int fd, void *uaddr, int addrlen, int ret)
{
	struct pt_pending p = { .fd = fd };
	if (read_sockaddr(uaddr, &p.family, &p.port, p.addr) || !watched(p.port))
		return 0;
	connect_done(&p, ret);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_bind")
int bind_enter(struct trace_event_raw_sys_enter *ctx)
{
	struct pt_pending p = { .fd = (int)ctx->args[0] };
	if (read_sockaddr((const void *)ctx->args[1], &p.family, &p.port, p.addr) ||
	    !bind_followed(&p))
		return 0;
	return stash(&p);
}

SEC("tracepoint/syscalls/sys_exit_bind")
int bind_exit(struct trace_event_raw_sys_exit *ctx)
{
	__u32 tid;
	struct pt_pending *p = kept(&tid);
	if (!p)
		return 0;
	bind_done(p, ctx->ret);
	bpf_map_delete_elem(&pending, &tid);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_listen")
int listen_enter(struct trace_event_raw_sys_enter *ctx)
{
	struct pt_pending p = { .fd = (int)ctx->args[0] };
	if (!listen_followed(p.fd))
		return 0;
	return stash(&p);
}

SEC("tracepoint/syscalls/sys_exit_listen")
int listen_exit(struct trace_event_raw_sys_exit *ctx)
{
	__u32 tid;
	struct pt_pending *p = kept(&tid);
	if (!p)
		return 0;
	listen_done(p, ctx->ret);
	bpf_map_delete_elem(&pending, &tid);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_connect")
int connect_enter(struct trace_event_raw_sys_enter *ctx)
{
	struct pt_pending p = { .fd = (int)ctx->args[0] };
	if (read_sockaddr((const void *)ctx->args[1], &p.family, &p.port, p.addr) || !watched(p.port))
		return 0;
	return stash(&p);
}

SEC("tracepoint/syscalls/sys_exit_connect")
int connect_exit(struct trace_event_raw_sys_exit *ctx)
{
	__u32 tid;
	struct pt_pending *p = kept(&tid);
	if (!p)
		return 0;
	connect_done(p, ctx->ret);
	bpf_map_delete_elem(&pending, &tid);
	return 0;
}

static __always_inline void keep_recent(__u16 port, struct pt_state *rec)
{
	struct pt_recent *r = bpf_map_lookup_elem(&recent, &port);
	if (!r) {
		static const struct pt_recent empty;
		bpf_map_update_elem(&recent, &port, &empty, BPF_NOEXIST);
		r = bpf_map_lookup_elem(&recent, &port);
		if (!r)
			return;
	}
	__u32 slot = __sync_fetch_and_add(&r->next, 1) % PT_RECENT;
	if (slot < PT_RECENT)
		r->ring[slot] = *rec;
}

/* tp_btf: the same tracepoint, raw: the program gets the struct sock itself
 * and no trace record is built first, which costs every TCP transition of
 * the host less than a classic tracepoint's record would. */
SEC("tp_btf/inet_sock_set_state")
int set_state(unsigned long long *ctx)
{
	struct sock *sk = (struct sock *)ctx[0];
	int olds = (int)ctx[1], news = (int)ctx[2];
	if (!sk || sk->sk_protocol != IPPROTO_TCP)
		return 0;
	struct sock_common *skc = &sk->__sk_common;
	/* tcp_set_state(TCP_CLOSE) has already released an autobound or
	 * accepted socket's port (inet_put_port zeroes inet_num) when the
	 * tracepoint fires; inet_sport still has it. */
	__u16 sport = skc->skc_num;
	if (!sport)
		sport = bpf_ntohs(BPF_CORE_READ((struct inet_sock *)sk, inet_sport));
	if (!watched(sport))
		return 0;
	__u64 skaddr = (__u64)sk;

	/* These transitions are made by a syscall of the socket's owner
	 * (listen, connect, close/shutdown), so the task on the CPU is the
	 * owner. Every other transition may run in softirq, on any task. */
	bool opening = olds == TCP_CLOSE && (news == TCP_LISTEN || news == TCP_SYN_SENT);
	bool closes_first = olds == TCP_ESTABLISHED && news == TCP_FIN_WAIT1;
	bool closing = closes_first || (olds == TCP_CLOSE_WAIT && news == TCP_LAST_ACK);
	/* Every port: only what a verdict reads, who listened (inherited fds)
	 * and who closed first (the minisock's closer); the rest only names
	 * the owner in streamed transitions, which this mode does not send. */
	if (all_ports) {
		closing = closes_first;
		opening = olds == TCP_CLOSE && news == TCP_LISTEN;
		if (!opening && !closing) {
			if (news == TCP_CLOSE)
				bpf_map_delete_elem(&owners, &skaddr);
			return 0;
		}
	}

	struct pt_state rec = {};
	__u16 family = skc->skc_family;
	rec.kind = PT_STATE;
	rec.protocol = IPPROTO_TCP;
	rec.oldstate = olds;
	rec.newstate = news;
	rec.ts_ns = bpf_ktime_get_ns();
	rec.skaddr = skaddr;
	rec.tuple.family = family;
	rec.tuple.sport = sport;
	rec.tuple.dport = bpf_ntohs(skc->skc_dport);
	if (family == AF_INET6) {
		bpf_probe_read_kernel(rec.tuple.saddr, 16, &skc->skc_v6_rcv_saddr);
		bpf_probe_read_kernel(rec.tuple.daddr, 16, &skc->skc_v6_daddr);
	} else {
		bpf_probe_read_kernel(rec.tuple.saddr, 4, &skc->skc_rcv_saddr);
		bpf_probe_read_kernel(rec.tuple.daddr, 4, &skc->skc_daddr);
	}

	if (opening || closing) {
		struct pt_task t = {};
		fill_task(&t);
		/* listen()/connect() keep the binder seen at bind(); a close
		 * names the closer. */
		bpf_map_update_elem(&owners, &skaddr, &t, opening ? BPF_NOEXIST : BPF_ANY);
		/* Who closes first owns the TIME_WAIT (or FIN_WAIT2) minisock
		 * this 4-tuple becomes. Remember it now, in the closer's own
		 * syscall: the FIN_WAIT2/CLOSING -> CLOSE that makes the minisock
		 * (tcp_time_wait() ends with tcp_done()) often runs in softirq,
		 * where the kernel skips this program if it was already running
		 * on that CPU (kernel/trace/bpf_trace.c: __bpf_trace_run). */
		if (closes_first)
			bpf_map_update_elem(&closers, &rec.tuple, &t, BPF_ANY);
	}
	if (all_ports)
		return 0;

	struct pt_task *owner = bpf_map_lookup_elem(&owners, &skaddr);
	if (owner)
		rec.owner = *owner;

	keep_recent(sport, &rec);
	if (stream_states) {
		struct pt_state *e = bpf_ringbuf_reserve(&events, sizeof(union pt_event), 0);
		if (e) {
			__builtin_memset(e, 0, sizeof(union pt_event));
			*e = rec;
			bpf_ringbuf_submit(e, 0);
		} else {
			count_lost(PT_LOST_EVENTS);
		}
	}
	if (news == TCP_CLOSE)
		bpf_map_delete_elem(&owners, &skaddr);
	return 0;
}

/* -- iterators: the sockets of the queried ports, at failure time ---------- */

static __always_inline struct pt_query *get_query(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&query, &zero);
}

static __always_inline void fill_sock(struct pt_sock *r, struct sock_common *skc, __u16 family)
{
	r->family = family;
	r->sport = BPF_CORE_READ(skc, skc_num);
	r->dport = bpf_ntohs(BPF_CORE_READ(skc, skc_dport));
	r->bound_dev_if = BPF_CORE_READ(skc, skc_bound_dev_if);
	r->opts = sock_opts(skc);
	r->skaddr = (__u64)skc;
	r->expires_ms = -1;
	read_local(skc, family, r->saddr);
	if (family == AF_INET6)
		bpf_probe_read_kernel(r->daddr, 16, &skc->skc_v6_daddr);
	else
		bpf_probe_read_kernel(r->daddr, 4, &skc->skc_daddr);
}

/* The references to a file: fds in every fd table, an iterator visiting it,
 * a syscall of a multithreaded process using it (fs/file.c: __fget_light),
 * an fd in flight over SCM_RIGHTS. 0: none, or a count being released. Each
 * layout is read in its own subprogram, so the relocation of the field this
 * kernel lacks stays where the verifier sees it is never reached. */
static __noinline __u32 refs_f_ref(__u64 file)
{
	long c = -1;
	bpf_core_read(&c, sizeof(c), &((struct file *)file)->f_ref.refcnt.counter);
	return c < 0 ? 0 : (__u32)c + 1;	/* include/linux/file_ref.h: file_ref_read */
}

static __noinline __u32 refs_f_count(__u64 file)
{
	long c = 0;
	bpf_core_read(&c, sizeof(c), &((struct file *)file)->f_count.counter);
	return c < 0 ? 0 : (__u32)c;
}

static __always_inline __u32 file_refs(struct file *f)
{
	if (!f)
		return 0;
	if (bpf_core_field_exists(struct file, f_ref))
		return refs_f_ref((__u64)f);
	return refs_f_count((__u64)f);
}

/* A full socket (not a minisock): also its state, owner, inode, file references
 * and cgroup (net/core/sock.c: sk_alloc -> cgroup_sk_alloc, its creator's). */
static __always_inline void fill_full_sock(struct pt_sock *r, struct sock *sk, __u16 family,
					   __u8 protocol)
{
	fill_sock(r, &sk->__sk_common, family);
	r->protocol = protocol;
	r->state = BPF_CORE_READ(sk, __sk_common.skc_state);
	r->uid = BPF_CORE_READ(sk, sk_uid.val);
	r->inode = sock_inode(sk);
	r->file_refs = file_refs(BPF_CORE_READ(sk, sk_socket, file));
	r->cgroup_id = BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);
}

/* The iterators' filter runs on every socket (or fd) of the host, so it reads
 * through the trusted pointers the iterator hands over (plain loads), and
 * only a match pays for the probed reads of fill_sock(). */
static __always_inline bool in_query(struct pt_query *q, __u16 family, __u16 port)
{
	return (family == AF_INET || family == AF_INET6) && port >= q->lo && port <= q->hi;
}

/* A TCP socket of the port: a minisock with its own timer, or a full socket. */
static __always_inline void fill_tcp(struct pt_sock *r, struct sock_common *skc, __u16 family,
				     __u8 state)
{
	if (state == TCP_TIME_WAIT) {
		struct inet_timewait_sock *tw = (struct inet_timewait_sock *)skc;
		fill_sock(r, skc, family);
		r->protocol = IPPROTO_TCP;
		r->minisock = 1;
		r->state = BPF_CORE_READ(tw, tw_substate);
		__u64 expires = BPF_CORE_READ(tw, tw_timer.expires), now = bpf_jiffies64();
		__u64 hz = CONFIG_HZ > 0 ? (__u64)CONFIG_HZ : 0;
		if (hz)
			r->expires_ms = expires > now ? (expires - now) * 1000 / hz : 0;
	} else {
		fill_full_sock(r, (struct sock *)skc, family, IPPROTO_TCP);
	}
}

SEC("iter/tcp")
int iter_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct pt_query *q = get_query();
	struct pt_sock r = {};
	if (!skc || !q)
		return 0;
	__u16 family = skc->skc_family;
	if (!in_query(q, family, skc->skc_num))
		return 0;
	__u8 state = skc->skc_state;
	if (state == TCP_NEW_SYN_RECV)
		return 0;	/* a request socket: its listener holds the port */
	fill_tcp(&r, skc, family, state);
	bpf_seq_write(ctx->meta->seq, &r, sizeof(r));
	return 0;
}

SEC("iter/udp")
int iter_udp(struct bpf_iter__udp *ctx)
{
	struct sock *sk = (struct sock *)ctx->udp_sk;
	struct pt_query *q = get_query();
	struct pt_sock r = {};
	if (!sk || !q)
		return 0;
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (!in_query(q, family, BPF_CORE_READ(sk, __sk_common.skc_num)))
		return 0;
	fill_full_sock(&r, sk, family, IPPROTO_UDP);
	bpf_seq_write(ctx->meta->seq, &r, sizeof(r));
	return 0;
}

SEC("iter/task_file")
int iter_task_file(struct bpf_iter__task_file *ctx)
{
	struct file *f = ctx->file;
	struct task_struct *task = ctx->task;
	struct pt_query *q = get_query();
	struct pt_sock r = {};
	if (!f || !task || !q)
		return 0;
	struct socket *so = bpf_sock_from_file(f);	/* NULL: not a socket */
	if (!so)
		return 0;
	struct sock *sk = so->sk;
	if (!sk)
		return 0;
	__u16 family = sk->__sk_common.skc_family;
	if (!in_query(q, family, sk->__sk_common.skc_num))
		return 0;
	if (sk->__sk_common.skc_net.net->ns.inum != q->netns)
		return 0;
	__u16 proto = BPF_CORE_READ(sk, sk_protocol);
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 0;
	fill_full_sock(&r, sk, family, proto);
	r.pid = BPF_CORE_READ(task, tgid);
	r.ppid = BPF_CORE_READ(task, real_parent, tgid);
	r.fd = ctx->fd;
	BPF_CORE_READ_STR_INTO(&r.comm, task, comm);
	bpf_seq_write(ctx->meta->seq, &r, sizeof(r));
	return 0;
}

/* -- walk_port: one port's sockets from the kernel's own hash ---------------
 *
 * Never attached: the frontend runs it with BPF_PROG_TEST_RUN in a thread
 * that has entered the failing netns, so it costs what the port holds, where
 * the iterators cost what the netns (and the host) holds. TCP: the bind hash
 * bucket bhash[(port + net->hash_mix) & (bhash_size - 1)]
 * (include/net/inet_hashtables.h: inet_bhashfn), whose inet_bind_buckets of
 * this net and port list every socket bound to it: listeners, bound-only,
 * connected, accepted children, TIME_WAIT and FIN_WAIT2 minisocks. UDP
 * (6.2+): udp_table->hash[(port + hash_mix) & mask] (include/net/udp.h:
 * udp_hashfn). The lists are read without their locks, under the RCU read
 * lock the test run holds: each socket's net and port are checked again, the
 * walk is capped, and a node that cannot be read ends it with a status, never
 * with a silently short list. Returns the sockets written to `found`, or a
 * PT_WALK_* status. */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);	/* read back in one BPF_MAP_LOOKUP_BATCH */
	__uint(max_entries, 16384);	/* resized before load */
	__type(key, __u32);
	__type(value, struct pt_sock);
} found SEC(".maps");

struct walk {
	__u64 net;
	__u64 tb;	/* next inet_bind_bucket node of the bucket's chain */
	__u64 tb2;	/* next inet_bind2_bucket node of the port (6.8+) */
	__u64 sk;	/* next socket node */
	__u64 link;	/* offset of that node in sock_common */
	__u32 n;	/* sockets written */
	int status;
	__u16 port;
	__u8 protocol;
	__u8 done;
};

/* The walk's state lives in a map value, not on the stack: before 6.7 the
 * verifier checked a bpf_loop callback as if it ran once, from the stack it
 * was handed, so a field that starts at 0 there (the next socket, while the
 * walk is still on the buckets) made its branch dead code, removed at load:
 * on 6.1 the walk found no socket. A map value's contents are unknown to
 * every verifier. One portrace process runs one walk at a time, in its own
 * object, so one entry serves. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct walk);
} walking SEC(".maps");

struct walk_ref {
	struct walk *w;
};

static __noinline __u64 tb_owners(__u64 tb)	/* 6.1-6.7 */
{
	return (__u64)BPF_CORE_READ((struct inet_bind_bucket *)tb, owners.first);
}

static __noinline __u64 tb_bhash2(__u64 tb)	/* 6.8+ */
{
	return (__u64)BPF_CORE_READ((struct inet_bind_bucket *)tb, bhash2.first);
}

static __noinline __u64 tb2_owners(__u64 node)	/* 6.8+ */
{
	__u64 tb2 = node - bpf_core_field_offset(struct inet_bind2_bucket, bhash_node);
	return (__u64)BPF_CORE_READ((struct inet_bind2_bucket *)tb2, owners.first);
}

static __noinline __u64 udp_slot(__u64 net, __u16 port)	/* 6.2+ */
{
	struct udp_table *t = BPF_CORE_READ((struct net *)net, ipv4.udp_table);
	__u32 mask = BPF_CORE_READ(t, mask);
	__u32 h = (port + BPF_CORE_READ((struct net *)net, hash_mix)) & mask;
	__u64 slot = (__u64)BPF_CORE_READ(t, hash) + (__u64)h * bpf_core_type_size(struct udp_hslot);
	return (__u64)BPF_CORE_READ((struct udp_hslot *)slot, head.first);
}

/* One hlist node's successor; a node that cannot be read ends the walk. */
static __always_inline __u64 next_node(struct walk *w, __u64 node)
{
	__u64 next = 0;
	if (bpf_core_read(&next, sizeof(next), &((struct hlist_node *)node)->next))
		w->status = PT_WALK_FAULT;
	return next;
}

static __always_inline void walked_sock(struct walk *w, struct sock_common *skc)
{
	/* A socket may move while the lock is not held: keep only this port's. */
	if (BPF_CORE_READ(skc, skc_num) != w->port || (__u64)BPF_CORE_READ(skc, skc_net.net) != w->net)
		return;
	__u16 family = BPF_CORE_READ(skc, skc_family);
	if (family != AF_INET && family != AF_INET6)
		return;
	__u32 key = w->n;
	struct pt_sock *r = bpf_map_lookup_elem(&found, &key);
	if (!r) {
		w->status = PT_WALK_FULL;
		return;
	}
	__builtin_memset(r, 0, sizeof(*r));
	if (w->protocol == IPPROTO_TCP)
		fill_tcp(r, skc, family, BPF_CORE_READ(skc, skc_state));
	else
		fill_full_sock(r, (struct sock *)skc, family, IPPROTO_UDP);
	w->n++;
}

static long walk_step(__u32 i, void *ctx)
{
	struct walk *w = ((struct walk_ref *)ctx)->w;
	if (w->sk) {
		__u64 node = w->sk;
		w->sk = next_node(w, node);
		walked_sock(w, (struct sock_common *)(node - w->link));
	} else if (w->tb2 && bpf_core_field_exists(struct inet_bind2_bucket, bhash_node)) {
		__u64 node = w->tb2;
		w->tb2 = next_node(w, node);
		w->sk = tb2_owners(node);
	} else if (w->tb) {
		__u64 node = w->tb;
		__u64 tb = node - bpf_core_field_offset(struct inet_bind_bucket, node);
		w->tb = next_node(w, node);
		/* One bucket per (net, port, l3mdev): walk each of ours. */
		if (BPF_CORE_READ((struct inet_bind_bucket *)tb, port) == w->port &&
		    (__u64)BPF_CORE_READ((struct inet_bind_bucket *)tb, ib_net.net) == w->net) {
			if (bpf_core_field_exists(struct inet_bind_bucket, bhash2))
				w->tb2 = tb_bhash2(tb);
			else if (bpf_core_field_exists(struct inet_bind_bucket, owners))
				w->sk = tb_owners(tb);
		}
	} else {
		w->done = 1;
	}
	return w->done || w->status ? 1 : 0;
}

SEC("raw_tp")
int walk_port(void *ctx)
{
	struct pt_query *q = get_query();
	if (!q)
		return PT_WALK_NO_LAYOUT;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct net *net = BPF_CORE_READ(task, nsproxy, net_ns);
	__u32 zero = 0;
	struct walk *w = bpf_map_lookup_elem(&walking, &zero);
	if (!w)
		return PT_WALK_NO_LAYOUT;
	__builtin_memset(w, 0, sizeof(*w));
	w->net = (__u64)net;
	w->port = q->lo;
	w->protocol = q->protocol;
	if (q->protocol == IPPROTO_TCP) {
		bool layout = bpf_core_field_exists(struct inet_bind_bucket, bhash2) ?
			bpf_core_field_exists(struct inet_bind2_bucket, bhash_node) :
			bpf_core_field_exists(struct inet_bind_bucket, owners);
		if (!layout)
			return PT_WALK_NO_LAYOUT;
		struct inet_hashinfo *h = BPF_CORE_READ(net, ipv4.tcp_death_row.hashinfo);
		__u32 size = BPF_CORE_READ(h, bhash_size);
		__u32 idx = (q->lo + BPF_CORE_READ(net, hash_mix)) & (size - 1);
		__u64 bucket = (__u64)BPF_CORE_READ(h, bhash) +
			(__u64)idx * bpf_core_type_size(struct inet_bind_hashbucket);
		w->tb = (__u64)BPF_CORE_READ((struct inet_bind_hashbucket *)bucket, chain.first);
		w->link = bpf_core_field_offset(struct sock_common, skc_bind_node);
	} else {
		if (!bpf_core_field_exists(struct netns_ipv4, udp_table))
			return PT_WALK_NO_LAYOUT;
		w->sk = udp_slot((__u64)net, q->lo);
		w->link = bpf_core_field_offset(struct sock_common, skc_node);
	}
	struct walk_ref ref = { .w = w };
	bpf_loop(q->max_steps, walk_step, &ref, 0);
	if (w->status)
		return w->status;
	return w->done ? (int)w->n : PT_WALK_STEP_CAP;
}
