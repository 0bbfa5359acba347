// SPDX-License-Identifier: GPL-2.0-only
/*
 * bench_empty.bpf.c - empty XDP and tc programs: the baseline each benchmark
 * ratio is measured against in the same run; and the flood generator, an
 * XDP program that transmits every frame BPF_PROG_TEST_RUN (live frames) feeds it.
 */
#include "natfix_common.h"

SEC("xdp")
int natfix_empty_xdp(struct xdp_md *ctx)
{
	return XDP_PASS;
}

SEC("classifier")
int natfix_empty_tc(struct __sk_buff *skb)
{
	return NATFIX_TC_NEXT;
}

SEC("xdp")
int natfix_gen_xdp(struct xdp_md *ctx)
{
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
