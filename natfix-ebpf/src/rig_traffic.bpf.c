// SPDX-License-Identifier: GPL-2.0-only
/*
 * rig_traffic.bpf.c - TEST RIG ONLY (built with the `rig` feature): the
 * flood generator, an XDP program that transmits every frame
 * BPF_PROG_TEST_RUN (live frames) feeds it; a counting drop-all XDP program
 * (the most a flood rig can measure); and a counting pass-all XDP program
 * (the baseline of the legitimate-traffic rows); and a tc program that
 * accepts every packet (TC_ACT_OK ends the tc chain): another owner's
 * program ahead of natfix's on a shared hook.
 */
#include "natfix_common.h"

SEC("xdp")
int rig_gen_xdp(struct xdp_md *ctx)
{
	return XDP_TX;
}

/* Per-CPU frame counts of the counting programs, one map each (userspace reads them by name). */
struct natfix_bench_count_map {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
};

struct natfix_bench_count_map natfix_bench_drops SEC(".maps");
struct natfix_bench_count_map natfix_bench_passes SEC(".maps");

static __always_inline void bench_count(void *map)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(map, &zero);

	if (n)
		(*n)++;
}

SEC("xdp")
int rig_drop_xdp(struct xdp_md *ctx)
{
	bench_count(&natfix_bench_drops);
	return XDP_DROP;
}

SEC("xdp")
int rig_count_pass_xdp(struct xdp_md *ctx)
{
	bench_count(&natfix_bench_passes);
	return XDP_PASS;
}

SEC("classifier")
int rig_accept_tc(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
