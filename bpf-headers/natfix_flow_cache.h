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
	__u64 hz = natfix_hz; /* one load of the volatile */

	return hz >= 8 ? hz >> 3 : hz;
}

/* The slot of an arriving tuple: daddr[0]^daddr[3]^saddr[0]^saddr[3]^ports
 * (words 1-3 of an IPv4 address are zero), spread by a multiplicative hash. */
static __always_inline struct natfix_flow_cache_slot *flow_cache_slot_of(__u32 addr_mix, __u16 dport, __u16 sport)
{
	__u32 idx = ((addr_mix ^ ((__u32)dport << 16 | sport)) * 0x9e3779b1U) >> (32 - NATFIX_FLOW_CACHE_BITS);

	return bpf_map_lookup_elem(&guard_flow_cache, &idx);
}

/* The slot the arriving packet's tuple maps to (never NULL in practice). */
static __always_inline struct natfix_flow_cache_slot *flow_cache_slot(const struct natfix_pkt *pkt)
{
	return flow_cache_slot_of(pkt->daddr[0] ^ pkt->daddr[3] ^ pkt->saddr[0] ^ pkt->saddr[3], pkt->dport,
				  pkt->sport);
}

/* A key's ports, family and (zero) pad as the one word they share. */
static __always_inline __u64 flow_cache_ports_family(__u16 local_port, __u16 remote_port, __u8 family)
{
	union {
		struct {
			__u16 local_port, remote_port;
			__u8 family, pad[3];
		};
		__u64 word;
	} w = { .local_port = local_port, .remote_port = remote_port, .family = family };

	return w.word;
}

/* The slot key's ports, family and (zero) pad: its last word, 8-aligned in
 * the slot, read as one load. */
static __always_inline __u64 flow_cache_key_ports_family(const struct natfix_flow_cache_slot *slot)
{
	_Static_assert(offsetof(struct natfix_flow_key, remote_port) == offsetof(struct natfix_flow_key, local_port) + 2 &&
			       offsetof(struct natfix_flow_key, family) == offsetof(struct natfix_flow_key, local_port) + 4 &&
			       offsetof(struct natfix_flow_cache_slot, key.local_port) % 8 == 0 &&
			       sizeof(struct natfix_flow_key) == offsetof(struct natfix_flow_key, local_port) + 8,
		       "ports, family and pad must form the key's last aligned word");
	return *(const __u64 *)__builtin_assume_aligned(&slot->key.local_port, 8);
}

/* A slot still fresh enough to answer (the caller compares the tuple). */
static __always_inline int flow_cache_fresh(const struct natfix_flow_cache_slot *slot, __u64 now_jiffies)
{
	return slot && now_jiffies - slot->checked_jiffies < flow_cache_window();
}

/* An IPv4 tuple, given as the packet's fields, against a fresh slot. */
static __always_inline int flow_cache_tuple_v4(const struct natfix_flow_cache_slot *slot, __u32 daddr, __u32 saddr,
					       __u16 dport, __u16 sport)
{
	return flow_cache_key_ports_family(slot) == flow_cache_ports_family(dport, sport, NATFIX_FAMILY_V4) &&
	       slot->key.local_addr[0] == daddr && slot->key.remote_addr[0] == saddr;
}

/* Compared field by field against the packet: no key is built on a hit.
 * An IPv4 slot's address words 1-3 are zero (flow_key_of_ingress of an IPv4
 * packet), so once the families match, IPv4 compares one word per address. */
static __always_inline int flow_cache_hit(const struct natfix_flow_cache_slot *slot,
					  const struct natfix_pkt *pkt, __u64 now_jiffies)
{
	const struct natfix_flow_key *k;

	if (!flow_cache_fresh(slot, now_jiffies))
		return 0;
	k = &slot->key;
	if (flow_cache_key_ports_family(slot) != flow_cache_ports_family(pkt->dport, pkt->sport, pkt->family) ||
	    k->local_addr[0] != pkt->daddr[0] || k->remote_addr[0] != pkt->saddr[0])
		return 0;
	if (pkt->family == NATFIX_FAMILY_V4)
		return 1;
	return k->local_addr[1] == pkt->daddr[1] && k->remote_addr[1] == pkt->saddr[1] &&
	       k->local_addr[2] == pkt->daddr[2] && k->remote_addr[2] == pkt->saddr[2] &&
	       k->local_addr[3] == pkt->daddr[3] && k->remote_addr[3] == pkt->saddr[3];
}

/* After the flow source said "solicited": remember it for a window. */
static __always_inline void flow_cache_fill(struct natfix_flow_cache_slot *slot,
					    const struct natfix_pkt *pkt, __u64 now_jiffies)
{
	if (slot) {
		flow_key_of_ingress(&slot->key, pkt);
		slot->checked_jiffies = now_jiffies;
	}
}

#endif /* NATFIX_FLOW_CACHE_H */
