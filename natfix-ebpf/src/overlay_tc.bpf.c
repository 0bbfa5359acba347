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
 *
 * The write itself happens in natfix_overlay_write, reached by tail call:
 * a program that writes packet memory directly gets a verifier prologue that
 * unclones every cloned skb it sees (and drops it if that fails), which must
 * not happen to traffic natfix does not own. Without the writer (not loaded,
 * or its program array cleared) bpf_skb_store_bytes() does the write.
 */
#include "natfix_common.h"
#include "natfix_counters.h"
#include "natfix_parse.h"
#include "natfix_csum.h"
#include "natfix_events.h"

const volatile struct natfix_overlay_config natfix_overlay_cfg = {};

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} overlay_writer SEC(".maps");

/* What overlay_fix() decided to write, handed to the writer in skb->cb. */
struct overlay_rewrite {
	__u32 check_off; /* offset of the UDP checksum from data */
	__u16 check;     /* the value to write, as it sits in the packet */
};

#define OVERLAY_CB_OFF 0
#define OVERLAY_CB_CHECK 1
#define OVERLAY_CB_COUNTER 2

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

/* The counter for this packet; for a rewrite (zeroed, recomputed) also *rw. */
static __always_inline int overlay_fix(struct __sk_buff *skb, struct overlay_rewrite *rw)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct natfix_csum_delta_slot *slot = NULL;
	__u32 window = natfix_overlay_cfg.delta_window_jiffies;
	__u64 now = 0;
	struct natfix_pkt pkt;
	struct udphdr *udp;
	__u32 udp_len;
	__u16 sent;
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
	rw->check_off = pkt.l4_off + offsetof(struct udphdr, check);

	if (pkt.family == NATFIX_FAMILY_V4 && !(natfix_overlay_cfg.flags & NATFIX_OVERLAY_F_RECOMPUTE)) {
		rw->check = 0;
		natfix_emit(NATFIX_CNT_OVERLAY_ZEROED, &pkt, skb->ifindex, skb->len);
		return NATFIX_CNT_OVERLAY_ZEROED;
	}

	sent = udp->check;
	if (sent && window) {
		now = bpf_jiffies64();
		slot = csum_delta_slot(&pkt);
		if (slot && now - slot->learned_jiffies < window && csum_delta_same_pair(slot, &pkt)) {
			rw->check = csum_delta_apply(sent, slot->delta);
			natfix_emit(NATFIX_CNT_OVERLAY_RECOMPUTED_DELTA, &pkt, skb->ifindex, skb->len);
			return NATFIX_CNT_OVERLAY_RECOMPUTED_DELTA;
		}
	}

	/* Sum in full: the whole datagram must be linear to be summed in place.
	 * (A length comparison, not pointer math: older verifiers lose the
	 * bounds of spilled scalars.) */
	if (pkt.l4_off + udp_len > (__u32)(data_end - data)) {
		if (bpf_skb_pull_data(skb, pkt.l4_off + udp_len))
			return NATFIX_CNT_OVERLAY_ERROR;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	if (udp_csum_full(skb, data, data_end, &pkt, udp_len, &rw->check))
		return NATFIX_CNT_OVERLAY_ERROR;
	if (slot)
		csum_delta_learn(slot, &pkt, sent, rw->check, now);
	natfix_emit(NATFIX_CNT_OVERLAY_RECOMPUTED, &pkt, skb->ifindex, skb->len);
	return NATFIX_CNT_OVERLAY_RECOMPUTED;
}

SEC("classifier")
int natfix_overlay_tc(struct __sk_buff *skb)
{
	struct overlay_rewrite rw = {};
	__u32 len = skb->len;
	int why = overlay_fix(skb, &rw);

	if (why == NATFIX_CNT_OVERLAY_ZEROED || why == NATFIX_CNT_OVERLAY_RECOMPUTED ||
	    why == NATFIX_CNT_OVERLAY_RECOMPUTED_DELTA) {
		skb->cb[OVERLAY_CB_OFF] = rw.check_off;
		skb->cb[OVERLAY_CB_CHECK] = rw.check;
		skb->cb[OVERLAY_CB_COUNTER] = why;
		bpf_tail_call(skb, &overlay_writer, 0);
		/* Still here: no writer. The helper unclones only this packet. */
		if (bpf_skb_store_bytes(skb, rw.check_off, &rw.check, sizeof(rw.check), BPF_F_RECOMPUTE_CSUM))
			why = NATFIX_CNT_OVERLAY_ERROR;
	}
	natfix_count(why, len);
	/* Never drops: a packet it cannot fix is the stack's to judge. */
	return NATFIX_TC_NEXT;
}

/* Tail-called for packets natfix owns only: writes the checksum in place. */
SEC("classifier")
int natfix_overlay_write(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	/* The UDP header sits within 17 KiB (8 extension headers at most);
	 * the mask lets the verifier bound the offset below its 64 KiB limit. */
	__u16 *check = data + (skb->cb[OVERLAY_CB_OFF] & 0x7fff);
	__u16 old, new = skb->cb[OVERLAY_CB_CHECK];

	if ((void *)(check + 1) > data_end) {
		natfix_count(NATFIX_CNT_OVERLAY_ERROR, skb->len);
		return NATFIX_TC_NEXT;
	}
	old = *check;
	*check = new;
	/* Software decryption (esp_input) leaves CHECKSUM_NONE; only a NIC that
	 * decrypts ESP may hand over CHECKSUM_COMPLETE, whose skb->csum must
	 * follow the change. The loader sets the flag for such interfaces. */
	if (natfix_overlay_cfg.flags & NATFIX_OVERLAY_F_CSUM_COMPLETE)
		bpf_csum_update(skb, (__u32)(__u16)~old + new);
	natfix_count(skb->cb[OVERLAY_CB_COUNTER], skb->len);
	return NATFIX_TC_NEXT;
}

char LICENSE[] SEC("license") = "GPL";
