/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Records shared by the kernel side (portrace.bpf.c) and the frontend's
 * decoder (src/portrace/probes.py). The frontend never mirrors these by
 * hand: it reads their compiled layout from the `pt_layout` map's value
 * type, so a field added here is decoded without a second definition.
 *
 * Every record starts with `kind`; the ring buffer carries one union of them.
 */
#ifndef PORTRACE_H
#define PORTRACE_H

#define PT_COMM_LEN 16

enum pt_kind {
	PT_BIND_ERROR = 1,	/* bind() returned < 0 on a watched port */
	PT_BIND_OK = 2,		/* bind() succeeded on a watched port */
	PT_STATE = 3,		/* inet_sock_set_state on a watched local port */
};

/* Who was on the CPU in process context, and when (CLOCK_MONOTONIC ns). */
struct pt_task {
	__u64 ts_ns;
	__u32 pid;		/* tgid */
	__u32 tid;
	char comm[PT_COMM_LEN];
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

struct pt_bind {
	__u8 kind;
	__u8 protocol;		/* IPPROTO_TCP/UDP from socket(), 0 = not seen */
	__u16 family;		/* from the sockaddr passed to bind() */
	__u16 port;		/* host order, from the sockaddr */
	__u16 pad;
	__s32 fd;
	__s32 err;		/* positive errno; 0 for PT_BIND_OK */
	__u32 uid;
	__u32 pad2;
	__u64 cgroup_id;
	struct pt_task task;
	__u8 addr[16];
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
	struct pt_bind bind;
	struct pt_state state;
};

struct pt_config {
	/* 1: every port, and only failures are streamed; 0: the ports in
	 * watched_ports, with successful binds and transitions streamed too. */
	__u8 all_ports;
};

#endif
