/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * natfix_flow_cache.h - a per-CPU, direct-mapped cache of recent "solicited"
 * verdicts in front of the guard's flow source (own table or conntrack).
 *
 * Why: asking the flow source costs a hash-map call (own) or a kfunc lookup
 * and release (conntrack); a cache hit is a few inline loads. Per-CPU slots
 * need no atomics: XDP and tc run with migration disabled.
 *
 * Contract: a slot admits its exact tuple for one window (natfix_hz / 8
 * jiffies, 125 ms) after the flow source last said "solicited"; the next
 * packet after that asks the source again, which also keeps refreshing the
 * own table's timestamp. So a flow that expires or is removed may still pass
 * for up to one window on a CPU that cached it; no other verdict changes.
 * Unsolicited packets are never cached: they always ask the source.
 * With natfix_hz unknown (0) the cache is off.
 */
#ifndef NATFIX_FLOW_CACHE_H
#define NATFIX_FLOW_CACHE_H

#include "natfix_common.h"
#include "natfix_clock.h"
#include "natfix_parse.h"

#define NATFIX_FLOW_CACHE_BITS 10
#define NATFIX_FLOW_CACHE_SLOTS (1U << NATFIX_FLOW_CACHE_BITS)

struct natfix_flow_cache_slot {
	struct natfix_flow_key key;
	__u64 checked_jiffies; /* when the flow source last said "solicited" */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NATFIX_FLOW_CACHE_SLOTS);
	__type(key, __u32);
	__type(value, struct natfix_flow_cache_slot);
} guard_flow_cache SEC(".maps") __weak;

/* A whole flow key (pad zeroed: keys are hashed and compared as bytes). */
static __always_inline void flow_key_fill(struct natfix_flow_key *key, __u8 family,
					  const __u32 *local, __u16 lport,
					  const __u32 *remote, __u16 rport)
{
	__builtin_memcpy(key->local_addr, local, sizeof(key->local_addr));
	__builtin_memcpy(key->remote_addr, remote, sizeof(key->remote_addr));
	key->local_port = lport;
	key->remote_port = rport;
	key->family = family;
	key->pad[0] = key->pad[1] = key->pad[2] = 0;
}

/* The key of an arriving packet: we are the local end. */
static __always_inline void flow_key_of_ingress(struct natfix_flow_key *key, const struct natfix_pkt *pkt)
{
	flow_key_fill(key, pkt->family, pkt->daddr, pkt->dport, pkt->saddr, pkt->sport);
}

/* An eighth of a second: a shift, not a division (the JIT would run a div). */
static __always_inline __u64 flow_cache_window(void)
{
	return natfix_hz >= 8 ? natfix_hz >> 3 : natfix_hz;
}

/* The slot the arriving packet's tuple maps to (never NULL in practice). */
static __always_inline struct natfix_flow_cache_slot *flow_cache_slot(const struct natfix_pkt *pkt)
{
	__u32 h = pkt->daddr[0] ^ pkt->daddr[3] ^ pkt->saddr[0] ^ pkt->saddr[3] ^
		  ((__u32)pkt->dport << 16 | pkt->sport);
	__u32 idx = (h * 0x9e3779b1U) >> (32 - NATFIX_FLOW_CACHE_BITS);

	return bpf_map_lookup_elem(&guard_flow_cache, &idx);
}

/* Compared field by field against the packet: no key is built on a hit.
 * An IPv4 slot's address words 1-3 are zero (flow_key_of_ingress of an IPv4
 * packet), so once the families match, IPv4 compares one word per address. */
static __always_inline int flow_cache_hit(const struct natfix_flow_cache_slot *slot,
					  const struct natfix_pkt *pkt, __u64 now_jiffies)
{
	const struct natfix_flow_key *k;

	if (!slot || now_jiffies - slot->checked_jiffies >= flow_cache_window())
		return 0;
	k = &slot->key;
	if (k->family != pkt->family || k->local_port != pkt->dport || k->remote_port != pkt->sport ||
	    k->local_addr[0] != pkt->daddr[0] || k->remote_addr[0] != pkt->saddr[0])
		return 0;
	if (pkt->family == NATFIX_FAMILY_V4)
		return 1;
	return k->local_addr[1] == pkt->daddr[1] && k->remote_addr[1] == pkt->saddr[1] &&
	       k->local_addr[2] == pkt->daddr[2] && k->remote_addr[2] == pkt->saddr[2] &&
	       k->local_addr[3] == pkt->daddr[3] && k->remote_addr[3] == pkt->saddr[3];
}

static __always_inline void flow_cache_fill(struct natfix_flow_cache_slot *slot,
					    const struct natfix_pkt *pkt, __u64 now_jiffies)
{
	if (slot) {
		flow_key_of_ingress(&slot->key, pkt);
		slot->checked_jiffies = now_jiffies;
	}
}

/* Whether the arriving packet `pkt` is solicited: the cache first, then
 * `ask_source` (evaluated only on a miss), whose "yes" is cached. */
#define NATFIX_SOLICITED_CACHED(pkt, ask_source)                            \
	({                                                                  \
		struct natfix_flow_cache_slot *__slot = flow_cache_slot(pkt); \
		__u64 __now = bpf_jiffies64();                              \
		int __ok = flow_cache_hit(__slot, (pkt), __now);            \
                                                                            \
		if (!__ok && (ask_source)) {                                \
			flow_cache_fill(__slot, (pkt), __now);              \
			__ok = 1;                                           \
		}                                                           \
		__ok;                                                       \
	})

#endif /* NATFIX_FLOW_CACHE_H */
