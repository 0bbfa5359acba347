// SPDX-License-Identifier: GPL-2.0-only
/*
 * trace_tp.bpf.c - `natfix trace`'s kernel side: where a traced packet
 * ended (dropped and why, sent out of a device, queued to a socket), as BTF
 * tracepoint programs (tp_btf: typed arguments, no tracefs, no kprobes).
 *
 * Which packets: those an nftables rule marked (`meta nftrace set 1`, which
 * natfix trace's own table does for the filter's packets and their flows in
 * every traced namespace), read as one bit of the skb, so other traffic
 * costs a load and a branch per hook. A drop before netfilter (tc, the IP
 * header checks) meets no mark: only drops, which are rare, are also matched
 * against the filter's rules and the flows userspace learned from conntrack
 * (with their NAT'd tuples), by reading the headers.
 *
 * Events go through one ring buffer; a full ring loses events, never packets.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "natfix_trace_abi.h"

char LICENSE[] SEC("license") = "GPL";

/* The few kernel fields read, as CO-RE views: aya relocates the offsets
 * against the running kernel's BTF. */
struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct net {
	struct ns_common ns;
} __attribute__((preserve_access_index));

typedef struct {
	struct net *net;
} possible_net_t;

struct net_device {
	char name[16];
	int ifindex;
	possible_net_t nd_net;
} __attribute__((preserve_access_index));

struct sock_common {
	possible_net_t skc_net;
} __attribute__((preserve_access_index));

struct sk_buff;

struct sk_buff_head {
	struct sk_buff *next;
	struct sk_buff *prev;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	struct sk_buff_head sk_receive_queue;
} __attribute__((preserve_access_index));

struct sk_buff {
	struct net_device *dev;
	struct sock *sk;
	unsigned int len;
	__u32 mark;
	__u8 nf_trace : 1;
	__u16 network_header;
	unsigned char *head;
	unsigned char *data;
} __attribute__((preserve_access_index));

/* The filter's rules: an array, so the lookup is inlined (userspace may
 * rewrite it while tracing). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct natfix_trace_filter);
} natfix_trace_filter SEC(".maps");

/* Exact tuples of the traced flows, as conntrack reported them (before and
 * after NAT, both directions). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct natfix_trace_tuple);
	__type(value, __u8);
} natfix_trace_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} natfix_trace_events SEC(".maps");

static __always_inline int marked(struct sk_buff *skb)
{
	return BPF_CORE_READ_BITFIELD(skb, nf_trace);
}

/* The network header: head + network_header, or data where it is unset. */
static __always_inline const unsigned char *l3_of(struct sk_buff *skb)
{
	__u16 nh = skb->network_header;

	if (nh == (__u16)~0U)
		return skb->data;
	return skb->head + nh;
}

/* Reads the addresses and ports (no IPv6 extension headers are walked:
 * such packets keep ports 0). Returns 0 when the packet is IP. */
static __always_inline int read_tuple(struct sk_buff *skb, struct natfix_trace_tuple *t)
{
	const unsigned char *l3 = l3_of(skb);
	__u8 h[44];
	__u32 ports = 0, l4 = 0;
	__u8 proto;

	if (bpf_probe_read_kernel(h, sizeof(h), l3))
		return -1;
	if ((h[0] >> 4) == 4) {
		__u32 ihl = (h[0] & 0xf) * 4;

		proto = h[9];
		__builtin_memcpy(t->saddr, &h[12], 4);
		__builtin_memcpy(t->daddr, &h[16], 4);
		t->family = 4;
		/* Non-first fragments carry no ports. */
		if ((h[6] & 0x1f) || h[7])
			l4 = 0;
		else if (ihl == 20)
			__builtin_memcpy(&ports, &h[20], 4), l4 = 1;
		else if (ihl > 20 && !bpf_probe_read_kernel(&ports, 4, l3 + ihl))
			l4 = 1;
	} else if ((h[0] >> 4) == 6) {
		proto = h[6];
		__builtin_memcpy(t->saddr, &h[8], 16);
		__builtin_memcpy(t->daddr, &h[24], 16);
		t->family = 6;
		__builtin_memcpy(&ports, &h[40], 4);
		l4 = 1;
	} else {
		return -1;
	}
	t->proto = proto;
	if (l4 && (proto == IPPROTO_UDP || proto == IPPROTO_TCP || proto == IPPROTO_SCTP ||
		   proto == IPPROTO_UDPLITE)) {
		t->sport = ports & 0xffff;
		t->dport = ports >> 16;
	}
	return 0;
}

static __always_inline int addr_match(const __u8 *a, const __u8 *want, const __u8 *mask)
{
	__u64 a0, a1, w0, w1, m0, m1;

	__builtin_memcpy(&a0, a, 8);
	__builtin_memcpy(&a1, a + 8, 8);
	__builtin_memcpy(&w0, want, 8);
	__builtin_memcpy(&w1, want + 8, 8);
	__builtin_memcpy(&m0, mask, 8);
	__builtin_memcpy(&m1, mask + 8, 8);
	return !((a0 ^ w0) & m0) && !((a1 ^ w1) & m1);
}

static __always_inline int rule_match(const struct natfix_trace_rule *r, const struct natfix_trace_tuple *t)
{
	if (r->family && r->family != t->family)
		return 0;
	if (r->proto && r->proto != t->proto)
		return 0;
	if (r->sport && r->sport != t->sport)
		return 0;
	if (r->dport && r->dport != t->dport)
		return 0;
	return addr_match(t->saddr, r->saddr, r->smask) && addr_match(t->daddr, r->daddr, r->dmask);
}

/* The filter's rules, then the flows' exact tuples. */
static __always_inline int wanted(const struct natfix_trace_tuple *t)
{
	__u32 zero = 0, i;
	struct natfix_trace_filter *f = bpf_map_lookup_elem(&natfix_trace_filter, &zero);

	if (!f)
		return 0;
	for (i = 0; i < NATFIX_TRACE_MAX_RULES; i++) {
		if (i >= f->nr_rules)
			break;
		if (rule_match(&f->rules[i], t))
			return 1;
	}
	return bpf_map_lookup_elem(&natfix_trace_flows, t) != 0;
}

static __always_inline void set_dev(struct natfix_trace_event *e, struct net_device *dev)
{
	e->ifindex = dev->ifindex;
	e->netns = dev->nd_net.net->ns.inum;
	BPF_CORE_READ_INTO(&e->dev, dev, name);
}

static __always_inline void fill(struct natfix_trace_event *e, struct sk_buff *skb, __u32 kind)
{
	e->ts_ns = bpf_ktime_get_ns();
	e->skb = (__u64)skb;
	e->kind = kind;
	e->len = skb->len;
	e->mark = skb->mark;
	e->nf_trace = marked(skb);
}

/* The event of a packet that passed the checks: filled here, after them,
 * so the common path (no mark) does not even clear it. */
/* `owner`: the sending device (XMIT), the receiving socket (DELIVER), none (DROP). */
static __noinline int emit(struct sk_buff *skb, void *owner, __u32 kind, __u64 location, __u32 reason)
{
	struct natfix_trace_event e = {};
	struct net_device *dev = 0;
	struct sock *sk = 0;

	read_tuple(skb, &e.tuple);
	if (kind == NATFIX_TRACE_DROP && !marked(skb) && !wanted(&e.tuple))
		return 0;
	fill(&e, skb, kind);
	e.location = location;
	e.reason = reason;
	if (kind == NATFIX_TRACE_XMIT)
		dev = owner;
	else if (kind == NATFIX_TRACE_DELIVER)
		sk = owner;
	else
		dev = skb->dev, sk = skb->sk;
	if (dev)
		set_dev(&e, dev);
	else if (sk)
		e.netns = sk->__sk_common.skc_net.net->ns.inum;
	bpf_ringbuf_output(&natfix_trace_events, &e, sizeof(e), 0);
	return 0;
}

SEC("tp_btf/kfree_skb")
int BPF_PROG(natfix_trace_drop, struct sk_buff *skb, void *location, unsigned int reason)
{
	/* Drops are rare: every one is read (unmarked ones against the filter). */
	return emit(skb, 0, NATFIX_TRACE_DROP, (__u64)location, reason);
}

SEC("tp_btf/net_dev_start_xmit")
int BPF_PROG(natfix_trace_xmit, struct sk_buff *skb, struct net_device *dev)
{
	if (!marked(skb))
		return 0;
	return emit(skb, dev, NATFIX_TRACE_XMIT, 0, 0);
}

/* UDP calls sk_data_ready right after queueing a datagram at the tail of
 * sk_receive_queue: the tail is that skb (another CPU may have queued one
 * since; its mark tells). */
SEC("tp_btf/sk_data_ready")
int BPF_PROG(natfix_trace_deliver, struct sock *sk)
{
	struct sk_buff *skb = sk->sk_receive_queue.prev;

	if (!skb || (void *)skb == (void *)&sk->sk_receive_queue || !marked(skb))
		return 0;
	return emit(skb, sk, NATFIX_TRACE_DELIVER, 0, 0);
}
