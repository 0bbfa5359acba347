/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * natfix_guard.h - the unsolicited-UDP guard's decision, shared by its XDP and
 * tc ingress programs. The flow lookup (own table or conntrack kfunc) is the
 * caller's: guard_classify() says whether one is needed.
 *
 * Order of checks (the Rust model in natfix/src/model/guard.rs follows it):
 *   parse result -> destination port in a guarded range -> --allow-port ->
 *   --allow-src -> flow lookup -> drop (or would-drop under --dry-run).
 */
#ifndef NATFIX_GUARD_H
#define NATFIX_GUARD_H

#include "natfix_common.h"
#include "natfix_parse.h"

/* Set by the loader before load; the verifier prunes disabled branches. */
const volatile struct natfix_guard_config natfix_guard_cfg __weak = {};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16); /* port, network byte order */
	__type(value, __u8);
} guard_allow_ports SEC(".maps") __weak;

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

static __always_inline int guard_port_guarded(__u16 port_be)
{
	__u16 port = bpf_ntohs(port_be);
	int i;

#pragma unroll
	for (i = 0; i < NATFIX_MAX_PORT_RANGES; i++) {
		if (i >= natfix_guard_cfg.nr_ranges)
			break;
		if (port >= natfix_guard_cfg.ranges[i].first && port <= natfix_guard_cfg.ranges[i].last)
			return 1;
	}
	return 0;
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
	default:
		return NATFIX_CNT_GUARD_OUT_OF_SCOPE;
	}
	if (!guard_port_guarded(pkt->dport))
		return NATFIX_CNT_GUARD_OUT_OF_SCOPE;
	if ((natfix_guard_cfg.flags & NATFIX_GUARD_F_ALLOW_PORTS) &&
	    bpf_map_lookup_elem(&guard_allow_ports, &pkt->dport))
		return NATFIX_CNT_GUARD_EXEMPT_PORT;
	if ((natfix_guard_cfg.flags & NATFIX_GUARD_F_ALLOW_SRC) && guard_src_allowed(pkt))
		return NATFIX_CNT_GUARD_EXEMPT_SRC;
	return GUARD_NEED_FLOW;
}

static __always_inline int guard_unsolicited(void)
{
	return (natfix_guard_cfg.flags & NATFIX_GUARD_F_DRY_RUN) ? NATFIX_CNT_GUARD_WOULD_DROP
								   : NATFIX_CNT_GUARD_DROP_UNSOLICITED;
}

#endif /* NATFIX_GUARD_H */
