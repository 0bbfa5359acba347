/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * natfix_ct.h - the conntrack lookup kfuncs, for the guard's
 * --flow-source conntrack build (compiled with -DNATFIX_FLOW_CONNTRACK).
 *
 * aya 0.14 cannot relocate kfunc calls; natfix/src/loader/kfunc.rs patches
 * the object before load (its module comment says how, and why kfuncs in
 * module BTF stay out of reach).
 * A packet is solicited when conntrack has its flow and the packet either
 * travels in the reply direction or the flow has already seen a reply:
 * the seed's `-m state --state ESTABLISHED` for UDP.
 */
#ifndef NATFIX_CT_H
#define NATFIX_CT_H

#include "natfix_common.h"
#include "natfix_parse.h"

/* The kernel reads exactly this size (NF_BPF_CT_OPTS_SZ = 12 up to 6.x; later also 16). */
struct bpf_ct_opts {
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;
	__u8 reserved[2];
};
#define NATFIX_CT_OPTS_SZ 12

/* Only the field we read; CO-RE finds it in the running kernel's nf_conn. */
struct nf_conn {
	unsigned long status;
} __attribute__((preserve_access_index));

#define NATFIX_IPS_SEEN_REPLY (1UL << 1)
#define NATFIX_CT_DIR_REPLY 1
#define NATFIX_CT_CURRENT_NETNS (-1)

extern struct nf_conn *bpf_xdp_ct_lookup(struct xdp_md *ctx, struct bpf_sock_tuple *tuple,
					 __u32 tuple_sz, struct bpf_ct_opts *opts,
					 __u32 opts_sz) __ksym;
extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *ctx, struct bpf_sock_tuple *tuple,
					 __u32 tuple_sz, struct bpf_ct_opts *opts,
					 __u32 opts_sz) __ksym;
extern void bpf_ct_release(struct nf_conn *ct) __ksym;

/* Fill the lookup tuple from the packet as it arrived; returns its size. */
static __always_inline __u32 ct_tuple_fill(struct bpf_sock_tuple *t, const struct natfix_pkt *pkt)
{
	if (pkt->family == NATFIX_FAMILY_V4) {
		t->ipv4.saddr = pkt->saddr[0];
		t->ipv4.daddr = pkt->daddr[0];
		t->ipv4.sport = pkt->sport;
		t->ipv4.dport = pkt->dport;
		return sizeof(t->ipv4);
	}
	__builtin_memcpy(t->ipv6.saddr, pkt->saddr, 16);
	__builtin_memcpy(t->ipv6.daddr, pkt->daddr, 16);
	t->ipv6.sport = pkt->sport;
	t->ipv6.dport = pkt->dport;
	return sizeof(t->ipv6);
}

/* Decide and release; ct may be NULL (no entry). */
static __always_inline int ct_solicited(struct nf_conn *ct, const struct bpf_ct_opts *opts)
{
	int solicited;

	if (!ct)
		return 0;
	solicited = opts->dir == NATFIX_CT_DIR_REPLY || (ct->status & NATFIX_IPS_SEEN_REPLY);
	bpf_ct_release(ct);
	return solicited;
}

#define NATFIX_CT_SOLICITED(lookup_fn, ctx, pkt)                                      \
	({                                                                            \
		struct bpf_sock_tuple __t = {};                                       \
		struct bpf_ct_opts __o = { .netns_id = NATFIX_CT_CURRENT_NETNS,      \
					   .l4proto = IPPROTO_UDP };                  \
		__u32 __sz = ct_tuple_fill(&__t, (pkt));                              \
		ct_solicited(lookup_fn((ctx), &__t, __sz, &__o, NATFIX_CT_OPTS_SZ), &__o); \
	})

#endif /* NATFIX_CT_H */
