// SPDX-License-Identifier: GPL-2.0-only
/*
 * flood_gen.bpf.c - the flood bench's traffic generator (compiled by the
 * bench at run time with the clang that builds natfix-ebpf). It runs under
 * BPF_PROG_TEST_RUN in XDP live-frames mode and transmits (XDP_TX) every
 * frame out of the generator's veth, as xdp-trafficgen does.
 *
 * With nr_flows 0 every frame leaves as given. With nr_flows N > 0 frame i
 * is rewritten to flow i mod N: source port first_sport + (i mod
 * per_dport), destination port first_dport + (i / per_dport), so N distinct
 * UDP tuples (a port has 65,535 values: 100,000 flows need two destination
 * ports) - what fills a conntrack table. The UDP checksum must be 0 (none,
 * legal for IPv4): ports change, the IP header does not. Live frames keep a
 * page's contents between runs, so every frame is rewritten in full.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

const volatile __u32 nr_flows = 0;
const volatile __u32 per_dport = 50000;
const volatile __u16 first_sport = 1024;
const volatile __u16 first_dport = 25000;

/* The next flow (the generator runs on one CPU). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} flood_gen_seq SEC(".maps");

SEC("xdp")
int flood_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct udphdr *udp = data + sizeof(struct ethhdr) + sizeof(struct iphdr);
	__u32 zero = 0, i, d;
	__u32 *seq;

	if (!nr_flows || (void *)(udp + 1) > data_end)
		return XDP_TX;
	seq = bpf_map_lookup_elem(&flood_gen_seq, &zero);
	if (!seq)
		return XDP_TX;
	i = *seq;
	*seq = i + 1 >= nr_flows ? 0 : i + 1;
	d = i / per_dport;
	udp->source = bpf_htons(first_sport + (i - d * per_dport));
	udp->dest = bpf_htons(first_dport + d);
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
