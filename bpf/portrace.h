/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Records shared by both engines' kernel sides (bcc.bpf.c for bcc,
 * core.bpf.c for libbpf CO-RE) and the frontend's decoders. The frontend
 * never mirrors these by hand: the bcc engine reads their compiled layout from
 * the `pt_layout` map's value type, the CO-RE engine from the object's own BTF,
 * so a field added here is decoded without a second definition.
 *
 * Every ring-buffer record starts with `kind`; the ring buffer carries one
 * union of them. Iterators write `struct pt_sock` records.
 */
#ifndef PORTRACE_H
#define PORTRACE_H

#define PT_COMM_LEN 16

enum pt_kind {
	PT_BIND_ERROR = 1,	/* bind() returned < 0 on a watched port, or port 0 */
	PT_BIND_OK = 2,		/* bind() succeeded on a watched port */
	PT_STATE = 3,		/* inet_sock_set_state on a watched local port */
	PT_LISTEN_ERROR = 4,	/* listen() returned < 0 on a watched or unbound socket */
	PT_CONNECT_ERROR = 5,	/* connect() to a watched port: EADDRNOTAVAIL/EADDRINUSE */
	PT_LISTEN_OK = 6,	/* listen() succeeded on a watched port */
};

/* Socket options the probes saw, from socket() (defaults) and setsockopt(). */
enum pt_opt {
	PT_OPT_REUSEADDR = 1,
	PT_OPT_REUSEPORT = 2,
	PT_OPT_V6ONLY = 4,
	PT_OPT_BINDTODEVICE = 8,	/* bound to some device (the name is not kept) */
};

/* Where a record's options come from. */
enum pt_source {
	PT_SRC_UNKNOWN = 0,
	PT_SRC_PROBES = 1,	/* seen being set: socket(), setsockopt() (bcc) */
	PT_SRC_KERNEL = 2,	/* read from the socket itself (CO-RE) */
};

#define PT_UID_UNKNOWN 0xffffffffu

struct pt_opts {
	__u8 known;		/* PT_OPT_* bits whose value below is known */
	__u8 on;		/* PT_OPT_* bits that are set */
};

/* Who was on the CPU in process context, and when (CLOCK_MONOTONIC ns);
 * opts: the options of the socket it acted on, when the probes know them. */
struct pt_task {
	__u64 ts_ns;
	__u32 pid;		/* tgid */
	__u32 tid;
	char comm[PT_COMM_LEN];
	struct pt_opts opts;
	__u8 pad[6];
};

/* One end of a socket, in network byte order as the kernel keeps it:
 * IPv4 addresses sit in the first four bytes of addr. */
struct pt_tuple {
	__u16 family;
	__u16 sport;		/* host order */
	__u16 dport;		/* host order */
	__u16 pad;
	__u8 saddr[16];
	__u8 daddr[16];
};

/* bind(), listen() or connect() on a socket. addr/port: for bind the address
 * asked for; for listen the address the probes saw it bound to (port 0: not
 * bound, listen() autobinds); for connect the destination. */
struct pt_call {
	__u8 kind;
	__u8 protocol;		/* IPPROTO_TCP/UDP (core: the socket's; bcc: socket()'s), 0 = not known */
	__u16 family;
	__u16 port;		/* host order */
	__u16 local_port;	/* connect: the port it was bound to, 0 = none */
	__s32 fd;
	__s32 err;		/* positive errno; 0 for PT_BIND_OK */
	__u32 uid;		/* the caller's real uid */
	struct pt_opts opts;
	__u8 opts_source;	/* enum pt_source */
	__u8 pad;
	__u64 cgroup_id;
	struct pt_task task;
	__u8 addr[16];
	/* Read from the kernel by the CO-RE engine; 0 (sk_uid: PT_UID_UNKNOWN)
	 * when the engine cannot read them (bcc). */
	__u32 netns;		/* inode of the calling thread's network namespace */
	__u32 sk_uid;		/* the socket's owner, sk_uid: creator's fsuid at socket() */
	__u16 range_lo;		/* the socket's IP_LOCAL_PORT_RANGE (6.8+), 0 = unset */
	__u16 range_hi;
	__u32 pad2;
	__u64 inode;		/* the socket's inode */
	__u64 skaddr;		/* the struct sock, to match its transitions */
};

struct pt_state {
	__u8 kind;
	__u8 pad;
	__u16 protocol;		/* IPPROTO_* as the tracepoint reports it */
	__s32 oldstate;		/* TCP_* from include/net/tcp_states.h */
	__s32 newstate;
	__u32 pad2;
	__u64 ts_ns;
	__u64 skaddr;
	struct pt_tuple tuple;
	/* The process last seen acting on this socket from a syscall (listen,
	 * connect, close/shutdown); owner.pid == 0 when none was seen. The
	 * task on the CPU is not used: most transitions run in softirq. */
	struct pt_task owner;
};

union pt_event {
	struct pt_call call;
	struct pt_state state;
};

/* What the probes know of one (process, fd) socket. */
struct pt_sockinfo {
	__u8 protocol;		/* 0 = socket() not seen */
	__u8 pad;
	struct pt_opts opts;
	__u16 family;		/* of the address bound, 0 = no bind() seen */
	__u16 port;
	__u8 addr[16];
};

/* One socket as a BPF iterator saw it (CO-RE engine): iter/tcp and iter/udp
 * write one per socket on the queried ports (holder fields zero); iter/task_file
 * one per (process, fd) of such a socket, bound-only sockets included. */
struct pt_sock {
	__u8 protocol;		/* IPPROTO_TCP/UDP */
	__u8 state;		/* TCP_*; a minisock's substate (TIME_WAIT, FIN_WAIT2) */
	__u8 minisock;		/* 1: an inet_timewait_sock */
	__u8 opts;		/* PT_OPT_* bits set; every bit is known */
	__u16 family;
	__u16 sport;		/* host order */
	__u16 dport;		/* host order */
	__u16 pad;
	__s32 bound_dev_if;
	__u32 uid;		/* sk_uid; 0 for minisocks (they keep none) */
	__u32 pid;		/* iter/task_file: the holder's tgid */
	__u32 ppid;		/* iter/task_file: its parent's tgid */
	__s32 fd;		/* iter/task_file: the holder's fd */
	__u32 file_refs;	/* references to the socket's file (0: none, or unknown) */
	__s64 expires_ms;	/* minisocks: ms until the timer fires; -1 otherwise */
	__u64 inode;		/* 0 for minisocks */
	__u64 skaddr;
	__u64 cgroup_id;	/* full sockets: the v2 cgroup they were created in */
	char comm[PT_COMM_LEN];	/* iter/task_file: the holder's comm */
	__u8 saddr[16];
	__u8 daddr[16];
};

/* What the iterators list: sockets of one netns with a local port in [lo, hi]. */
struct pt_query {
	__u32 netns;		/* inode; iter/task_file filters by it (tcp/udp list the creator's) */
	__u16 lo;
	__u16 hi;
	__u8 protocol;		/* walk_port: IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad[3];
	__u32 max_steps;	/* walk_port: list nodes it may visit */
};

/* What walk_port returns when it has no complete answer (>= 0: the number of
 * sockets it wrote to the found map). */
enum pt_walk {
	PT_WALK_NO_LAYOUT = -1,	/* this kernel's hash has a layout the walk cannot read */
	PT_WALK_STEP_CAP = -2,	/* the bucket holds more nodes than max_steps */
	PT_WALK_FULL = -3,	/* more sockets on the port than the found map holds */
	PT_WALK_FAULT = -4,	/* a list node could not be read (freed under the walk) */
};

/* The last transitions seen on a watched port, kept in the kernel (CO-RE). */
/* A watched port's failures reach the failures ring at most PT_RATE_MAX
 * per PT_RATE_NS window; beyond that they are counted in lost slot 2, so a
 * flood on one port leaves room for the others'. */
#define PT_RATE_NS 100000000ULL
#define PT_RATE_MAX 256
#define PT_LOST_EVENTS 0	/* the events ring was full */
#define PT_LOST_FAILURES 1	/* the failures ring was full */
#define PT_LOST_LIMITED 2	/* over a port's rate */
#define PT_LOST_SLOTS 3
struct pt_rate {
	__u64 window_ns;
	__u32 n;
	__u32 pad;
};

#define PT_RECENT 16
struct pt_recent {
	__u32 next;		/* total written; slot = next % PT_RECENT */
	__u32 pad;
	struct pt_state ring[PT_RECENT];
};

struct pt_config {
	/* 1: every port, and only failures are streamed; 0: the ports in
	 * watched_ports, with successful binds and transitions streamed too. */
	__u8 all_ports;
};

#endif
