// SPDX-License-Identifier: GPL-2.0-only
/*
 * overlay_tc.bpf.c - tc ingress on the underlay: repair the UDP checksum of
 * VXLAN packets that IPsec (ESP transport mode) has just decrypted.
 *
 * Behind a 1:1 NAT the inner UDP checksum covers pre-NAT addresses the NAT
 * could not fix (it was sealed in ESP), so the receiving stack would drop
 * every decrypted VXLAN packet. The decrypted packet reaches tc ingress only
 * on the ESP GRO path (esp4_offload/esp6_offload + GRO), carrying its xfrm
 * secpath: only such packets are touched. IPv4: zero the checksum (legal,
 * RFC 768) or recompute it; IPv6: always recompute (zero is not legal).
 */
#include "natfix_common.h"
#include "natfix_counters.h"
#include "natfix_parse.h"
#include "natfix_csum.h"
#include "natfix_events.h"

const volatile struct natfix_overlay_config natfix_overlay_cfg = {};

static __always_inline int overlay_port(__u16 port_be)
{
	__u16 port = bpf_ntohs(port_be);
	int i;

#pragma unroll
	for (i = 0; i < NATFIX_MAX_VXLAN_PORTS; i++) {
		if (i >= natfix_overlay_cfg.nr_ports)
			break;
		if (port == natfix_overlay_cfg.vxlan_ports[i])
			return 1;
	}
	return 0;
}

/* Counter for a packet that is ours to fix, or -1 to go on fixing it. */
static __always_inline int overlay_gate(struct __sk_buff *skb)
{
	struct bpf_xfrm_state st = {};

	if (natfix_overlay_cfg.flags & NATFIX_OVERLAY_F_NO_SECPATH)
		return -1;
	/* Fails unless the skb carries a secpath: cleartext VXLAN. */
	if (bpf_skb_get_xfrm_state(skb, 0, &st, sizeof(st), 0))
		return NATFIX_CNT_OVERLAY_CLEARTEXT;
	if ((natfix_overlay_cfg.flags & NATFIX_OVERLAY_F_MATCH_REQID) && st.reqid != natfix_overlay_cfg.reqid)
		return NATFIX_CNT_OVERLAY_OTHER_SA;
	return -1;
}

static __always_inline int overlay_fix(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct natfix_pkt pkt;
	struct udphdr *udp;
	__u32 udp_len, check_off;
	__u16 check = 0;
	int rc, gate;

	rc = natfix_parse_udp(data, data_end, &pkt);
	if (rc == NATFIX_PARSE_MALFORMED)
		return NATFIX_CNT_OVERLAY_MALFORMED;
	if (rc != NATFIX_PARSE_UDP || !overlay_port(pkt.dport))
		return NATFIX_CNT_OVERLAY_NOT_VXLAN;
	gate = overlay_gate(skb);
	if (gate >= 0)
		return gate;

	udp = data + pkt.l4_off;
	if ((void *)(udp + 1) > data_end)
		return NATFIX_CNT_OVERLAY_MALFORMED;
	udp_len = bpf_ntohs(udp->len);
	/* The datagram must lie within the packet; trailing bytes are padding. */
	if (pkt.l4_off + udp_len > skb->len)
		return NATFIX_CNT_OVERLAY_MALFORMED;
	check_off = pkt.l4_off + offsetof(struct udphdr, check);

	if (pkt.family == NATFIX_FAMILY_V4 && !(natfix_overlay_cfg.flags & NATFIX_OVERLAY_F_RECOMPUTE)) {
		if (bpf_skb_store_bytes(skb, check_off, &check, sizeof(check), BPF_F_RECOMPUTE_CSUM))
			return NATFIX_CNT_OVERLAY_ERROR;
		natfix_emit(NATFIX_CNT_OVERLAY_ZEROED, &pkt, skb->ifindex, skb->len);
		return NATFIX_CNT_OVERLAY_ZEROED;
	}

	/* Recompute: the whole datagram must be linear to be summed in place.
	 * (A length comparison, not pointer math: older verifiers lose the
	 * bounds of spilled scalars.) */
	if (pkt.l4_off + udp_len > (__u32)(data_end - data)) {
		if (bpf_skb_pull_data(skb, pkt.l4_off + udp_len))
			return NATFIX_CNT_OVERLAY_ERROR;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	if (udp_csum_full(skb, data, data_end, &pkt, udp_len, &check))
		return NATFIX_CNT_OVERLAY_ERROR;
	if (bpf_skb_store_bytes(skb, check_off, &check, sizeof(check), BPF_F_RECOMPUTE_CSUM))
		return NATFIX_CNT_OVERLAY_ERROR;
	natfix_emit(NATFIX_CNT_OVERLAY_RECOMPUTED, &pkt, skb->ifindex, skb->len);
	return NATFIX_CNT_OVERLAY_RECOMPUTED;
}

SEC("classifier")
int natfix_overlay_tc(struct __sk_buff *skb)
{
	__u32 len = skb->len;

	natfix_count(overlay_fix(skb), len);
	/* Never drops: a packet it cannot fix is the stack's to judge. */
	return NATFIX_TC_NEXT;
}

char LICENSE[] SEC("license") = "GPL";
