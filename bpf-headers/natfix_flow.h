/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * natfix_flow.h - natfix's own flow table: filled on egress (and from
 * conntrack by userspace), consulted on ingress by the guard.
 *
 * An entry admits replies while its last_seen_ns is younger than the
 * configured idle timeout. Times come from bpf_ktime_get_coarse_ns()
 * (CLOCK_MONOTONIC_COARSE in userspace): a timeout needs no more precision
 * and the coarse clock costs a fraction of the precise one. Both directions refresh it, as conntrack does,
 * but at most once per NATFIX_FLOW_REFRESH_NS to keep the cache line quiet.
 */
#ifndef NATFIX_FLOW_H
#define NATFIX_FLOW_H

#include "natfix_common.h"
#include "natfix_parse.h"
#include "natfix_guard.h"
#include "natfix_flow_cache.h"

#define NATFIX_FLOW_REFRESH_NS 1000000000ULL

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); /* the loader sets --flow-table-size */
	__type(key, struct natfix_flow_key);
	__type(value, struct natfix_flow_value);
} guard_flows SEC(".maps") __weak;

/*
 * Local ports that ever had a flow: a packet to a port that never did is
 * unsolicited without a table lookup (a flood's drop path). A port is marked
 * before its first flow is inserted (here and by userspace, flowsync.rs) and
 * never unmarked, so the map can wrongly say "maybe", never wrongly "no".
 * One byte per port, always stored as 1: concurrent writers cannot undo
 * each other's mark the way read-modify-write of a shared bitmap word could.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);  /* port, host byte order */
	__type(value, __u8); /* 1 once the port had a flow */
} guard_flow_ports SEC(".maps") __weak;

static __always_inline void flow_port_mark(__u16 port_be)
{
	__u32 port = bpf_ntohs(port_be);
	__u8 *seen = bpf_map_lookup_elem(&guard_flow_ports, &port);

	if (seen && !*seen)
		*seen = 1;
}

static __always_inline int flow_port_maybe(__u16 port_be)
{
	__u32 port = bpf_ntohs(port_be);
	__u8 *seen = bpf_map_lookup_elem(&guard_flow_ports, &port);

	return seen && *seen;
}

static __always_inline __u64 guard_flow_timeout_ns(void)
{
	__u32 zero = 0;
	struct natfix_guard_settings *s = bpf_map_lookup_elem(&guard_settings, &zero);

	return s ? s->flow_timeout_ns : 0;
}

static __always_inline void flow_key_wildcard(struct natfix_flow_key *key)
{
	__builtin_memset(key->remote_addr, 0, sizeof(key->remote_addr));
	key->remote_port = 0;
}

/* Ingress: does the arriving packet answer a flow we saw leave (and is it
 * still live)? A port that never had a flow answers without a lookup; the
 * clock is read only on a hit. */
static __always_inline int flow_own_solicited(const struct natfix_pkt *pkt)
{
	struct natfix_flow_key key;
	struct natfix_flow_value *v;
	__u64 now;

	if (!flow_port_maybe(pkt->dport))
		return 0;
	flow_key_of_ingress(&key, pkt);
	v = bpf_map_lookup_elem(&guard_flows, &key);
	if (!v && (natfix_guard_cfg.flags & NATFIX_GUARD_F_ENDPOINT_INDEP)) {
		flow_key_wildcard(&key);
		v = bpf_map_lookup_elem(&guard_flows, &key);
	}
	if (!v)
		return 0;
	now = bpf_ktime_get_coarse_ns();
	/* Signed: an entry stamped by userspace may be a tick ahead of the coarse clock. */
	if ((__s64)(now - v->last_seen_ns) > (__s64)guard_flow_timeout_ns())
		return 0;
	if ((__s64)(now - v->last_seen_ns) > (__s64)NATFIX_FLOW_REFRESH_NS)
		v->last_seen_ns = now;
	return 1;
}

/* Egress: record or refresh one key; returns the counter id for it. */
static __always_inline int flow_own_learn_key(struct natfix_flow_key *key, __u64 now)
{
	struct natfix_flow_value fresh = { .last_seen_ns = now };
	struct natfix_flow_value *v;

	flow_port_mark(key->local_port); /* before the flow exists */
	v = bpf_map_lookup_elem(&guard_flows, key);
	if (v) {
		if ((__s64)(now - v->last_seen_ns) > (__s64)NATFIX_FLOW_REFRESH_NS)
			v->last_seen_ns = now;
		return NATFIX_CNT_FLOW_REFRESHED;
	}
	if (bpf_map_update_elem(&guard_flows, key, &fresh, BPF_ANY))
		return NATFIX_CNT_FLOW_LEARN_FAILED;
	return NATFIX_CNT_FLOW_LEARNED;
}

#endif /* NATFIX_FLOW_H */
