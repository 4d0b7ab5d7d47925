/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What both kernel sides do the same way at a bind(), listen() or connect():
 * name the task, read the address the caller passed, and keep a watched
 * port's failures within its rate. Included by
 * bcc.bpf.c (bcc) and core.bpf.c (CO-RE) after their own headers, which
 * provide AF_INET/AF_INET6, struct sockaddr_in/_in6 and the helpers.
 */
#ifndef PORTRACE_CALLS_H
#define PORTRACE_CALLS_H

#include "portrace.h"

/* Who is on the CPU, in process context, and when (CLOCK_MONOTONIC). */
static __always_inline void fill_task(struct pt_task *t)
{
	__u64 id = bpf_get_current_pid_tgid();
	t->ts_ns = bpf_ktime_get_ns();
	t->pid = id >> 32;
	t->tid = (__u32)id;
	bpf_get_current_comm(&t->comm, sizeof(t->comm));
}

/* Read a sockaddr from the caller's memory, at syscall entry: a failed bind
 * has reset the socket's port by exit. sockaddr_in first, so a short IPv4
 * buffer at a page end is not over-read. Returns 0 for AF_INET/AF_INET6. */
static __always_inline int read_sockaddr(const void *uaddr, __u16 *family, __u16 *port,
					 __u8 *addr)
{
	struct sockaddr_in6 sa = {};
	if (bpf_probe_read_user(&sa, sizeof(struct sockaddr_in), uaddr))
		return -1;
	if (sa.sin6_family == AF_INET6 && bpf_probe_read_user(&sa, sizeof(sa), uaddr))
		return -1;
	if (sa.sin6_family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)&sa;
		__builtin_memcpy(addr, &sin->sin_addr, 4);
	} else if (sa.sin6_family == AF_INET6) {
		__builtin_memcpy(addr, &sa.sin6_addr, 16);
	} else {
		return -1;
	}
	*family = sa.sin6_family;
	*port = bpf_ntohs(sa.sin6_port);
	return 0;
}

/* A watched port's rate (PT_RATE_MAX failures per PT_RATE_NS), given its
 * entry ``r`` in the caller's port_rate map: 1 when this failure is over it.
 * The count is not atomic (bcc's LLVM has no fetch-and-add with a result):
 * CPUs racing may let a flood send a few records more, never fewer. */
static __always_inline int rate_spent(struct pt_rate *r, __u64 now)
{
	if (now - r->window_ns > PT_RATE_NS) {
		r->window_ns = now;
		r->n = 1;
		return 0;
	}
	if (r->n >= PT_RATE_MAX)
		return 1;
	r->n++;
	return 0;
}

#endif
