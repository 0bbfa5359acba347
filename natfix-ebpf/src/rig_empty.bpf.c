// SPDX-License-Identifier: GPL-2.0-only
/*
 * rig_empty.bpf.c - TEST RIG ONLY (built with the `rig` feature): empty XDP
 * and tc programs, the baseline each benchmark ratio is measured against in
 * the same run.
 */
#include "natfix_common.h"

SEC("xdp")
int rig_empty_xdp(struct xdp_md *ctx)
{
	return XDP_PASS;
}

SEC("classifier")
int rig_empty_tc(struct __sk_buff *skb)
{
	return NATFIX_TC_NEXT;
}

char LICENSE[] SEC("license") = "GPL";
