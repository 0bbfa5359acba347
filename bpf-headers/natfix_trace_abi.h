/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * natfix_trace_abi.h - the ABI between `natfix trace`'s tracepoint programs
 * (trace_tp.bpf.c) and userspace (natfix/src/trace/drops.rs).
 *
 * Mirrored by #[repr(C)] types in natfix-ebpf/src/trace_abi.rs, which asserts
 * the sizes at compile time. Unlike natfix_abi.h nothing here outlives one
 * `natfix trace` run (no pins), so it may change with the program.
 */
#ifndef NATFIX_TRACE_ABI_H
#define NATFIX_TRACE_ABI_H

#include <linux/types.h>

/* Where a packet was seen. */
enum natfix_trace_kind {
	NATFIX_TRACE_DROP    = 1, /* skb:kfree_skb: freed with a drop reason */
	NATFIX_TRACE_XMIT    = 2, /* net:net_dev_start_xmit: handed to a device's driver */
	NATFIX_TRACE_DELIVER = 3, /* sock:sk_data_ready: queued to a socket */
};

/* A packet's addresses and ports as read from its headers. IPv4 addresses
 * take the first 4 bytes (the rest zero); ports are in network order, 0
 * where the protocol has none. */
struct natfix_trace_tuple {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 family; /* 4 or 6; 0: not IP, or the headers were unreadable */
	__u8 pad[2];
};

#define NATFIX_TRACE_MAX_RULES 8

/* One alternative of the filter: a packet matches when every field agrees.
 * Addresses are compared under their mask (all zero: any); ports, proto
 * and family are wildcards when 0. */
struct natfix_trace_rule {
	__u8 saddr[16];
	__u8 smask[16];
	__u8 daddr[16];
	__u8 dmask[16];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};

/* The filter as the drop program applies it to packets no nftables rule
 * marked (drops before netfilter: tc, IP header checks). */
struct natfix_trace_filter {
	struct natfix_trace_rule rules[NATFIX_TRACE_MAX_RULES];
	__u32 nr_rules;
	__u32 pad;
};

struct natfix_trace_event {
	__u64 ts_ns;    /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 skb;      /* the skb's address: the same across a veth, reused after free */
	__u64 location; /* DROP: the kernel text address that freed it */
	__u32 kind;     /* enum natfix_trace_kind */
	__u32 reason;   /* DROP: enum skb_drop_reason of the running kernel */
	__u32 netns;    /* inode of the network namespace */
	__u32 ifindex;  /* the device (XMIT: the one sending), 0 if none */
	__u32 len;
	__u32 mark;
	__u8 nf_trace;  /* marked by an nftables `meta nftrace set 1` */
	__u8 pad[7];
	char dev[16];
	struct natfix_trace_tuple tuple;
};

#endif /* NATFIX_TRACE_ABI_H */
