/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * natfix_guard.h - the unsolicited-UDP guard's decision, shared by its XDP and
 * tc ingress programs. The flow source (own table or conntrack kfunc) is the
 * caller's: guard_lookup() says whether it must be asked, guard_answer()
 * turns its answer into the verdict.
 *
 * Which ports are guarded or exempt, dry-run and the allow-src switch are
 * live settings in maps (natfix_abi.h); filtering is fixed at load.
 *
 * Order of checks (the Rust model in tests/src/model/guard.rs follows it):
 *   parse result (too deep: drop) -> destination port in a guarded range ->
 *   --allow-port -> --allow-src -> flow (cache, then source) -> drop (or
 *   would-drop under --dry-run).
 */
#ifndef NATFIX_GUARD_H
#define NATFIX_GUARD_H

#include "natfix_common.h"
#include "natfix_parse.h"
#include "natfix_flow_cache.h"

/* Set by the loader before load; the verifier prunes disabled branches. */
const volatile struct natfix_guard_config natfix_guard_cfg __weak = {};

/* Which ports are guarded, exempt, learned: bit planes (natfix_abi.h), live. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NATFIX_PORT_PLANES * NATFIX_PORT_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} guard_ports SEC(".maps") __weak;

/* The guard's live settings (one entry). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct natfix_guard_settings);
} guard_settings SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct natfix_lpm_v4);
	__type(value, __u8);
} guard_allow_src4 SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct natfix_lpm_v6);
	__type(value, __u8);
} guard_allow_src6 SEC(".maps") __weak;

/* Returned by guard_classify() when only a flow lookup can decide. */
#define GUARD_NEED_FLOW (-1)

/* Whether `port_be` is in bit plane `plane` of guard_ports: one array
 * lookup, which the verifier inlines. */
static __always_inline int guard_port_in(__u32 plane, __u16 port_be)
{
	__u16 port = bpf_ntohs(port_be);
	__u32 word = plane * NATFIX_PORT_WORDS + (port >> 6);
	__u64 *bits = bpf_map_lookup_elem(&guard_ports, &word);

	return bits && ((*bits >> (port & 63)) & 1);
}

static __always_inline int guard_port_guarded(__u16 port_be)
{
	return guard_port_in(NATFIX_PORT_PLANE_GUARDED, port_be);
}

static __always_inline int guard_port_exempt(__u16 port_be)
{
	return guard_port_in(NATFIX_PORT_PLANE_EXEMPT, port_be);
}

/* Egress: whether flows from this local port are learned (own table). */
static __always_inline int guard_port_learned(__u16 port_be)
{
	return guard_port_in(NATFIX_PORT_PLANE_LEARN, port_be);
}

static __always_inline __u32 guard_settings_flags(void)
{
	__u32 zero = 0;
	struct natfix_guard_settings *s = bpf_map_lookup_elem(&guard_settings, &zero);

	return s ? s->flags : 0;
}

static __always_inline int guard_src_allowed(const struct natfix_pkt *pkt)
{
	if (pkt->family == NATFIX_FAMILY_V4) {
		struct natfix_lpm_v4 key = { .prefixlen = 32, .addr = pkt->saddr[0] };

		return bpf_map_lookup_elem(&guard_allow_src4, &key) != NULL;
	} else {
		struct natfix_lpm_v6 key = { .prefixlen = 128 };

		__builtin_memcpy(key.addr, pkt->saddr, sizeof(key.addr));
		return bpf_map_lookup_elem(&guard_allow_src6, &key) != NULL;
	}
}

/* Headers the parser cannot reach may hide UDP to a guarded port that the
 * kernel will hand to conntrack: dropped, as no legitimate traffic is so deep. */
static __always_inline int guard_too_deep(void)
{
	return (guard_settings_flags() & NATFIX_GUARD_S_DRY_RUN) ? NATFIX_CNT_GUARD_WOULD_DROP
								 : NATFIX_CNT_GUARD_DROP_TOO_DEEP;
}

/* Whether the verdict `why` drops the packet. */
static __always_inline int guard_drops(int why)
{
	return why == NATFIX_CNT_GUARD_DROP_UNSOLICITED || why == NATFIX_CNT_GUARD_DROP_TOO_DEEP;
}

/* For UDP to a guarded port: an exemption's counter, else GUARD_NEED_FLOW. */
static __always_inline int guard_exemption(const struct natfix_pkt *pkt)
{
	if (guard_port_exempt(pkt->dport))
		return NATFIX_CNT_GUARD_EXEMPT_PORT;
	if ((guard_settings_flags() & NATFIX_GUARD_S_ALLOW_SRC) && guard_src_allowed(pkt))
		return NATFIX_CNT_GUARD_EXEMPT_SRC;
	return GUARD_NEED_FLOW;
}

/* A counter id for packets decided without a flow lookup, else GUARD_NEED_FLOW. */
static __always_inline int guard_classify(int parse_rc, const struct natfix_pkt *pkt)
{
	switch (parse_rc) {
	case NATFIX_PARSE_UDP:
		break;
	case NATFIX_PARSE_FRAGMENT:
		return NATFIX_CNT_GUARD_FRAGMENT;
	case NATFIX_PARSE_MALFORMED:
		return NATFIX_CNT_GUARD_MALFORMED;
	case NATFIX_PARSE_TOO_DEEP:
		return guard_too_deep();
	default:
		return NATFIX_CNT_GUARD_OUT_OF_SCOPE;
	}
	if (!guard_port_guarded(pkt->dport))
		return NATFIX_CNT_GUARD_OUT_OF_SCOPE;
	return guard_exemption(pkt);
}

static __always_inline int guard_unsolicited(void)
{
	return (guard_settings_flags() & NATFIX_GUARD_S_DRY_RUN) ? NATFIX_CNT_GUARD_WOULD_DROP
								 : NATFIX_CNT_GUARD_DROP_UNSOLICITED;
}

/* guard_v4_fast() leaves the packet to the general path. */
#define GUARD_NOT_FAST (-2)

static __always_inline void guard_pkt_v4(struct natfix_pkt *pkt, __u32 saddr, __u32 daddr, __u16 sport, __u16 dport)
{
	natfix_pkt_set_v4(pkt, saddr, daddr);
	pkt->sport = sport;
	pkt->dport = dport;
	pkt->l3_off = sizeof(struct ethhdr);
	pkt->l4_off = sizeof(struct ethhdr) + sizeof(struct iphdr);
}

/*
 * The common case in registers (natfix_udp4_plain()'s shape). It reaches the
 * verdict the general path would without building a natfix_pkt unless the
 * flow source must be asked. Returns a counter; or GUARD_NEED_FLOW with *pkt
 * set; or GUARD_NOT_FAST for any other shape.
 */
static __always_inline int guard_v4_fast(void *data, void *data_end, struct natfix_pkt *pkt)
{
	struct iphdr *iph = data + sizeof(struct ethhdr);
	struct udphdr *udp = natfix_udp4_plain(data, data_end);
	struct natfix_flow_cache_slot *slot;
	__u64 now;
	int why;

	if (!udp)
		return GUARD_NOT_FAST;
	if (!guard_port_guarded(udp->dest))
		return NATFIX_CNT_GUARD_OUT_OF_SCOPE;
	/* Exemptions come before flows. */
	if (guard_port_exempt(udp->dest))
		return NATFIX_CNT_GUARD_EXEMPT_PORT;
	if (guard_settings_flags() & NATFIX_GUARD_S_ALLOW_SRC) {
		guard_pkt_v4(pkt, iph->saddr, iph->daddr, udp->source, udp->dest);
		why = guard_exemption(pkt);
		if (why != GUARD_NEED_FLOW)
			return why;
	}
	/* The tuple is read from the packet again after each call rather than
	 * kept in registers the calls clobber: L1 loads instead of stack spills. */
	slot = flow_cache_slot_of(iph->daddr ^ iph->saddr, udp->dest, udp->source);
	now = bpf_jiffies64();
	if (flow_cache_fresh(slot, now) && flow_cache_tuple_v4(slot, iph->daddr, iph->saddr, udp->dest, udp->source))
		return NATFIX_CNT_GUARD_PASS_SOLICITED;
	guard_pkt_v4(pkt, iph->saddr, iph->daddr, udp->source, udp->dest);
	return GUARD_NEED_FLOW;
}

/* Everything before the flow source: a counter, or GUARD_NEED_FLOW with
 * *pkt set for the source and guard_answer(). */
static __always_inline int guard_lookup(void *data, void *data_end, struct natfix_pkt *pkt)
{
	int why = guard_v4_fast(data, data_end, pkt);

	if (why != GUARD_NOT_FAST)
		return why;
	why = guard_classify(natfix_parse_udp(data, data_end, pkt), pkt);
	if (why != GUARD_NEED_FLOW)
		return why;
	return flow_cache_hit(flow_cache_slot(pkt), pkt, bpf_jiffies64()) ? NATFIX_CNT_GUARD_PASS_SOLICITED
									  : GUARD_NEED_FLOW;
}

/* The flow source's answer as the verdict; a "solicited" is cached. The slot
 * is looked up again here rather than kept from guard_lookup(): keeping it
 * across the source's calls costs the hit path stack spills, and a
 * solicited miss is rare (once per window per flow and CPU). */
static __always_inline int guard_answer(int solicited, const struct natfix_pkt *pkt)
{
	if (!solicited)
		return guard_unsolicited();
	flow_cache_fill(flow_cache_slot(pkt), pkt, bpf_jiffies64());
	return NATFIX_CNT_GUARD_PASS_SOLICITED;
}

#endif /* NATFIX_GUARD_H */
