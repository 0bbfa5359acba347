/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * natfix_flow_cache.h - a per-CPU, direct-mapped cache of recent "solicited"
 * verdicts in front of the guard's flow source (own table or conntrack).
 *
 * Why: asking the flow source costs a hash-map call (own) or a kfunc lookup
 * and release (conntrack); a cache hit is a few inline loads. Per-CPU slots
 * need no atomics: XDP and tc run with migration disabled.
 *
 * Contract: a slot admits its exact tuple for one window (natfix_hz / 10
 * jiffies, 100 ms) after the flow source last said "solicited"; the next
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

/* The key of an arriving packet: we are the local end. */
static __always_inline void flow_key_of_ingress(struct natfix_flow_key *key, const struct natfix_pkt *pkt)
{
	__builtin_memcpy(key->local_addr, pkt->daddr, sizeof(key->local_addr));
	__builtin_memcpy(key->remote_addr, pkt->saddr, sizeof(key->remote_addr));
	key->local_port = pkt->dport;
	key->remote_port = pkt->sport;
	key->family = pkt->family;
	key->pad[0] = key->pad[1] = key->pad[2] = 0;
}

static __always_inline int flow_key_equal(const struct natfix_flow_key *a, const struct natfix_flow_key *b)
{
	/* 32-bit words: a key on the stack is only 4-aligned. */
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
	int i;

	_Static_assert(sizeof(*a) == 10 * sizeof(__u32), "flow key is ten words");
#pragma unroll
	for (i = 0; i < 10; i++)
		if (x[i] != y[i])
			return 0;
	return 1;
}

static __always_inline __u64 flow_cache_window(void)
{
	return natfix_hz >= 10 ? natfix_hz / 10 : natfix_hz;
}

/* The slot `key` maps to (never NULL in practice: the index is masked). */
static __always_inline struct natfix_flow_cache_slot *flow_cache_slot(const struct natfix_flow_key *key)
{
	__u32 h = key->local_addr[0] ^ key->local_addr[3] ^ key->remote_addr[0] ^ key->remote_addr[3] ^
		  ((__u32)key->local_port << 16 | key->remote_port);
	__u32 idx = (h * 0x9e3779b1U) >> (32 - NATFIX_FLOW_CACHE_BITS);

	return bpf_map_lookup_elem(&guard_flow_cache, &idx);
}

static __always_inline int flow_cache_hit(const struct natfix_flow_cache_slot *slot,
					  const struct natfix_flow_key *key, __u64 now_jiffies)
{
	return slot && now_jiffies - slot->checked_jiffies < flow_cache_window() && flow_key_equal(&slot->key, key);
}

static __always_inline void flow_cache_fill(struct natfix_flow_cache_slot *slot,
					    const struct natfix_flow_key *key, __u64 now_jiffies)
{
	if (slot) {
		slot->key = *key;
		slot->checked_jiffies = now_jiffies;
	}
}

/* Whether the arriving packet with key `key` (a struct natfix_flow_key *,
 * flow_key_of_ingress) is solicited: the cache first, then `ask_source`
 * (evaluated only on a miss), whose "yes" is cached. */
#define NATFIX_SOLICITED_CACHED(key, ask_source)                            \
	({                                                                  \
		struct natfix_flow_cache_slot *__slot = flow_cache_slot(key); \
		__u64 __now = bpf_jiffies64();                              \
		int __ok = flow_cache_hit(__slot, (key), __now);            \
                                                                            \
		if (!__ok && (ask_source)) {                                \
			flow_cache_fill(__slot, (key), __now);              \
			__ok = 1;                                           \
		}                                                           \
		__ok;                                                       \
	})

#endif /* NATFIX_FLOW_CACHE_H */
