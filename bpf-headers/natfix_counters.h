/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * natfix_counters.h - the per-CPU counter array, indexed by enum natfix_counter.
 * Userspace sums the CPUs (natfix stats, metrics). Weak so that every program
 * linked into one object shares the single map.
 */
#ifndef NATFIX_COUNTERS_H
#define NATFIX_COUNTERS_H

#include "natfix_common.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NATFIX_CNT_MAX);
	__type(key, __u32);
	__type(value, struct natfix_counter_value);
} natfix_counters SEC(".maps") __weak;

/* Counts one packet of `bytes` under `counter`; returns this CPU's packet
 * count after it (0 when the slot is missing): event sampling keys off it. */
static __always_inline __u64 natfix_count_n(__u32 counter, __u64 bytes)
{
	struct natfix_counter_value *v = bpf_map_lookup_elem(&natfix_counters, &counter);

	/* Per-CPU slot: plain adds are race-free. */
	if (!v)
		return 0;
	v->bytes += bytes;
	return ++v->packets;
}

static __always_inline void natfix_count(__u32 counter, __u64 bytes)
{
	natfix_count_n(counter, bytes);
}

#endif /* NATFIX_COUNTERS_H */
