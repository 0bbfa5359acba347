/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * natfix_events.h - sampled events for `natfix monitor`: drops and rewrites,
 * rate-limited per CPU in the kernel so a flood cannot flood userspace.
 *
 * natfix_event_rate (a one-entry map; userspace sets it at attach and
 * `natfix set --events-rate` changes it live; 0 = off) is the budget of each
 * CPU per second. Events over the budget, or finding the ring full, are
 * skipped: the counters stay exact.
 */
#ifndef NATFIX_EVENTS_H
#define NATFIX_EVENTS_H

#include "natfix_common.h"
#include "natfix_parse.h"
#include "natfix_clock.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32); /* events per CPU per second */
} natfix_event_rate SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} natfix_events SEC(".maps") __weak;

struct natfix_event_budget {
	__u64 window_start_jiffies;
	__u32 used;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct natfix_event_budget);
} natfix_event_budget SEC(".maps") __weak;

static __always_inline int natfix_event_allowed(void)
{
	__u32 zero = 0;
	__u32 *rate = bpf_map_lookup_elem(&natfix_event_rate, &zero);
	struct natfix_event_budget *b;
	__u64 now;

	if (!rate || !*rate)
		return 0;
	b = bpf_map_lookup_elem(&natfix_event_budget, &zero);
	if (!b)
		return 0;
	/* Jiffies: an inline load, so a flood's drop path makes no clock call.
	 * Unknown HZ: 1000 jiffies is at least a second for any HZ <= 1000. */
	now = bpf_jiffies64();
	if (now - b->window_start_jiffies >= (natfix_hz ? natfix_hz : 1000)) {
		b->window_start_jiffies = now;
		b->used = 0;
	}
	if (b->used >= *rate)
		return 0;
	b->used++;
	return 1;
}

/* Steady-state events (the overlay's rewrites) are sampled before the budget
 * is asked: the first on each CPU and every NATFIX_EVENT_SAMPLE-th after, so
 * the hot path pays one mask test for a count it already has. */
#define NATFIX_EVENT_SAMPLE 64

static __always_inline int natfix_event_sampled(__u64 per_cpu_count)
{
	/* natfix_emit() itself checks that events are on. */
	return (per_cpu_count & (NATFIX_EVENT_SAMPLE - 1)) == 1;
}

static __always_inline void natfix_emit(__u32 counter, const struct natfix_pkt *pkt, __u32 ifindex, __u32 len)
{
	struct natfix_event *e;

	if (!natfix_event_allowed())
		return;
	e = bpf_ringbuf_reserve(&natfix_events, sizeof(*e), 0);
	if (!e)
		return;
	e->ts_ns = bpf_ktime_get_coarse_ns();
	e->counter = counter;
	e->ifindex = ifindex;
	__builtin_memcpy(e->saddr, pkt->saddr, sizeof(e->saddr));
	__builtin_memcpy(e->daddr, pkt->daddr, sizeof(e->daddr));
	e->sport = pkt->sport;
	e->dport = pkt->dport;
	e->len = len;
	e->family = pkt->family;
	__builtin_memset(e->pad, 0, sizeof(e->pad));
	bpf_ringbuf_submit(e, 0);
}

#endif /* NATFIX_EVENTS_H */
