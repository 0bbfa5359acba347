// SPDX-License-Identifier: GPL-2.0-only
/*
 * rig_tp_empty.bpf.c - TEST RIG ONLY (built with the `rig` feature): empty
 * BTF tracepoint programs on the tracepoints `natfix trace` uses, the
 * baseline of the trace bench (what a program on the tracepoint costs at all).
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

SEC("tp_btf/kfree_skb")
int BPF_PROG(rig_empty_tp_drop)
{
	return 0;
}

SEC("tp_btf/net_dev_start_xmit")
int BPF_PROG(rig_empty_tp_xmit)
{
	return 0;
}

SEC("tp_btf/sk_data_ready")
int BPF_PROG(rig_empty_tp_deliver)
{
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
