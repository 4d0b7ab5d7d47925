/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The few kernel types the CO-RE engine (core.bpf.c) reads, in the style of
 * libbpf-tools: only the members used, marked preserve_access_index so that
 * libbpf relocates every offset against the running kernel's BTF
 * (/sys/kernel/btf/vmlinux) at load time. Nothing here has to match a kernel
 * version's layout; the names must exist in the kernel's BTF (checked on 6.1,
 * 6.12 and 6.18). Members that only some kernels have are tested with
 * bpf_core_field_exists() before use.
 */
#ifndef PORTRACE_KERNEL_TYPES_H
#define PORTRACE_KERNEL_TYPES_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;
enum { false = 0, true = 1 };

enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_RINGBUF = 27,
};

enum { BPF_ANY = 0, BPF_NOEXIST = 1, BPF_EXIST = 2 };
enum { BPF_F_NO_COMMON_LRU = 1U << 1 };

#define PRESERVE __attribute__((preserve_access_index))

/* uapi, fixed size: copied whole, never entered. */
struct in6_addr {
	__u8 s6_addr[16];
};

struct ns_common {
	unsigned int inum;
} PRESERVE;

struct net;

typedef struct {
	struct net *net;
} possible_net_t;

struct hlist_node {
	struct hlist_node *next;
} PRESERVE;

struct hlist_head {
	struct hlist_node *first;
} PRESERVE;

/* The port's bind hash (include/net/inet_hashtables.h). 6.1-6.7 chain every
 * socket of the port on inet_bind_bucket.owners; 6.8+ chain the port's
 * inet_bind2_buckets (one per address) on inet_bind_bucket.bhash2, each with
 * its sockets on owners. Both link sockets and minisocks by skc_bind_node. */
struct inet_bind_bucket {
	possible_net_t ib_net;
	unsigned short port;
	struct hlist_node node;
	struct hlist_head owners;	/* 6.1-6.7 */
	struct hlist_head bhash2;	/* 6.8+ */
} PRESERVE;

struct inet_bind2_bucket {
	struct hlist_node bhash_node;	/* 6.8+ */
	struct hlist_head owners;
} PRESERVE;

struct inet_bind_hashbucket {
	struct hlist_head chain;
} PRESERVE;

struct inet_hashinfo {
	struct inet_bind_hashbucket *bhash;
	unsigned int bhash_size;
} PRESERVE;

struct inet_timewait_death_row {
	struct inet_hashinfo *hashinfo;
} PRESERVE;

/* Per-netns UDP hash (6.2+; before, one global udp_table with no BTF VAR). */
struct udp_hslot {
	struct hlist_head head;
} PRESERVE;

struct udp_table {
	struct udp_hslot *hash;
	unsigned int mask;
} PRESERVE;

struct netns_ipv4 {
	struct inet_timewait_death_row tcp_death_row;
	struct udp_table *udp_table;	/* 6.2+ */
} PRESERVE;

struct net {
	struct ns_common ns;
	__u32 hash_mix;
	struct netns_ipv4 ipv4;
} PRESERVE;

struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	unsigned char skc_reuse:4;
	unsigned char skc_reuseport:1;
	unsigned char skc_ipv6only:1;
	int skc_bound_dev_if;
	struct hlist_node skc_bind_node;	/* TCP: on the port's bind bucket */
	struct hlist_node skc_node;	/* UDP: on the port's udp_table slot */
	possible_net_t skc_net;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
} PRESERVE;

struct timer_list {
	unsigned long expires;
} PRESERVE;

struct inet_timewait_sock {
	struct sock_common __tw_common;
	unsigned char tw_substate;
	struct timer_list tw_timer;
} PRESERVE;

typedef struct {
	__u32 val;
} kuid_t;

struct inode {
	unsigned short i_mode;
	unsigned long i_ino;
} PRESERVE;

typedef struct {
	long counter;
} atomic_long_t;

/* include/linux/file_ref.h (6.13+): the count of references minus one. */
typedef struct {
	atomic_long_t refcnt;
} file_ref_t;

struct file {
	void *private_data;
	struct inode *f_inode;
	atomic_long_t f_count;	/* before 6.13 */
	file_ref_t f_ref;	/* 6.13+ */
} PRESERVE;

struct sock;

struct socket {
	struct sock *sk;
	struct file *file;
} PRESERVE;

struct kernfs_node {
	__u64 id;
} PRESERVE;

struct cgroup {
	struct kernfs_node *kn;
} PRESERVE;

struct sock_cgroup_data {
	struct cgroup *cgroup;	/* the default (v2) hierarchy's */
} PRESERVE;

struct sock {
	struct sock_common __sk_common;
	struct sock_cgroup_data sk_cgrp_data;
	struct socket *sk_socket;
	kuid_t sk_uid;
	__u16 sk_protocol;
	__u16 sk_type;
} PRESERVE;

/* local_port_range (6.8+): the socket's own IP_LOCAL_PORT_RANGE, high << 16 |
 * low (0: unset); 6.5-6.7 had a struct of two u16 there, which this engine
 * does not read. */
struct inet_sock {
	struct sock sk;
	__be16 inet_sport;
	__u32 local_port_range;
} PRESERVE;

struct udp_sock {
	struct inet_sock inet;
} PRESERVE;

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
} PRESERVE;

struct files_struct {
	struct fdtable *fdt;
} PRESERVE;

struct nsproxy {
	struct net *net_ns;
} PRESERVE;

struct task_struct {
	int pid;
	int tgid;
	struct task_struct *real_parent;
	char comm[16];
	struct files_struct *files;
	struct nsproxy *nsproxy;
} PRESERVE;

struct seq_file;

struct bpf_iter_meta {
	struct seq_file *seq;
	__u64 session_id;
	__u64 seq_num;
} PRESERVE;

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
	__u32 uid;
} PRESERVE;

struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
	__u32 uid;
	int bucket;
} PRESERVE;

struct bpf_iter__task_file {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
	__u32 fd;
	struct file *file;
} PRESERVE;

struct trace_entry {
	unsigned short type;
} PRESERVE;

struct trace_event_raw_sys_enter {
	struct trace_entry ent;
	long id;
	unsigned long args[6];
} PRESERVE;

struct trace_event_raw_sys_exit {
	struct trace_entry ent;
	long id;
	long ret;
} PRESERVE;

struct trace_event_raw_inet_sock_set_state {
	struct trace_entry ent;
	const void *skaddr;
	int oldstate;
	int newstate;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u16 protocol;
	__u8 saddr[4];
	__u8 daddr[4];
	__u8 saddr_v6[16];
	__u8 daddr_v6[16];
} PRESERVE;

/* uapi: fixed, not relocated. */
struct sockaddr_in {
	unsigned short sin_family;
	__be16 sin_port;
	__be32 sin_addr;
	__u8 zero[8];
};

struct sockaddr_in6 {
	unsigned short sin6_family;
	__be16 sin6_port;
	__be32 sin6_flowinfo;
	struct in6_addr sin6_addr;
	__u32 sin6_scope_id;
};

#endif
