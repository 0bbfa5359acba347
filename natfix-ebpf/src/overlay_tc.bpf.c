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
 * The write itself happens in a writer program reached by tail call: a
 * program that writes packet memory directly gets a verifier prologue that
 * unclones every cloned skb it sees (and drops it if that fails), which must
 * not happen to traffic natfix does not own. natfix_overlay_write_v4z takes
 * the common case (zero mode, option-less IPv4) with nothing to hand over;
 * natfix_overlay_write any rewrite, directed by skb->cb. Without the writers
 * (not loaded, or their program array cleared) bpf_skb_store_bytes() writes.
 *
 * Rewrites are the steady state, so their events are sampled before the
 * per-CPU budget is asked (natfix_event_sampled()).
 */
#include "natfix_common.h"
#include "natfix_counters.h"
#include "natfix_parse.h"
#include "natfix_csum.h"
#include "natfix_events.h"

const volatile struct natfix_overlay_config natfix_overlay_cfg = {};

/* The overlay fix's live settings (one entry): VXLAN ports, reqid. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct natfix_overlay_settings);
} overlay_settings SEC(".maps");

static __always_inline struct natfix_overlay_settings *overlay_settings_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&overlay_settings, &zero);
}

/* Slots of the writers' program array (the loader fills both). */
#define OVERLAY_WRITER_ANY 0
#define OVERLAY_WRITER_V4_ZERO 1

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} overlay_writer SEC(".maps");

/* What overlay_fix() decided to write; natfix_overlay_write gets it in skb->cb. */
struct overlay_rewrite {
	__u32 check_off; /* offset of the UDP checksum from data */
	__u16 check;     /* the value to write, as it sits in the packet */
};

#define OVERLAY_CB_OFF 0
#define OVERLAY_CB_CHECK 1
#define OVERLAY_CB_COUNTER 2

/* The UDP header and checksum of an option-less IPv4 datagram in an Ethernet frame. */
#define OVERLAY_V4_UDP_OFF (sizeof(struct ethhdr) + sizeof(struct iphdr))
#define OVERLAY_V4_CHECK_OFF (OVERLAY_V4_UDP_OFF + offsetof(struct udphdr, check))

static __always_inline int overlay_port(__u16 port_be)
{
	struct natfix_overlay_settings *s = overlay_settings_get();
	__u16 port = bpf_ntohs(port_be);
	int i;

	if (!s)
		return 0;
#pragma unroll
	for (i = 0; i < NATFIX_MAX_VXLAN_PORTS; i++) {
		if (i >= s->nr_ports)
			break;
		if (port == s->vxlan_ports[i])
			return 1;
	}
	return 0;
}

/* Counter for a packet that is ours to fix, or -1 to go on fixing it. */
static __always_inline int overlay_gate(struct __sk_buff *skb)
{
	/* Uninitialised: the helper fills it or fails (ARG_PTR_TO_UNINIT_MEM). */
	struct bpf_xfrm_state st;
	struct natfix_overlay_settings *s;

	if (natfix_overlay_cfg.flags & NATFIX_OVERLAY_F_NO_SECPATH)
		return -1;
	/* Fails unless the skb carries a secpath: cleartext VXLAN. */
	if (bpf_skb_get_xfrm_state(skb, 0, &st, sizeof(st), 0))
		return NATFIX_CNT_OVERLAY_CLEARTEXT;
	s = overlay_settings_get();
	if (s && (s->flags & NATFIX_OVERLAY_S_MATCH_REQID) && st.reqid != s->reqid)
		return NATFIX_CNT_OVERLAY_OTHER_SA;
	return -1;
}

/* A rewrite overlay_fix() decided on, for the writer. */
static __always_inline int overlay_is_rewrite(int why)
{
	return why == NATFIX_CNT_OVERLAY_ZEROED || why == NATFIX_CNT_OVERLAY_RECOMPUTED ||
	       why == NATFIX_CNT_OVERLAY_RECOMPUTED_DELTA;
}

/* The recompute path: a learned per-pair delta, else the full sum. */
static __always_inline int overlay_recompute(struct __sk_buff *skb, struct natfix_pkt *pkt,
					     struct udphdr *udp, __u32 udp_len, __u16 *check)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 window = natfix_overlay_cfg.delta_window_jiffies;
	struct natfix_csum_delta_slot *slot = NULL;
	__u16 sent = udp->check;
	__u64 now = 0;

	if (sent && window) {
		now = bpf_jiffies64();
		slot = csum_delta_slot(pkt);
		if (slot && now - slot->learned_jiffies < window && csum_delta_same_pair(slot, pkt)) {
			*check = csum_delta_apply(sent, slot->delta);
			return NATFIX_CNT_OVERLAY_RECOMPUTED_DELTA;
		}
	}

	/* Sum in full: the whole datagram must be linear to be summed in place.
	 * (A length comparison, not pointer math: older verifiers lose the
	 * bounds of spilled scalars.) */
	if (pkt->l4_off + udp_len > (__u32)(data_end - data)) {
		if (bpf_skb_pull_data(skb, pkt->l4_off + udp_len))
			return NATFIX_CNT_OVERLAY_ERROR;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	if (udp_csum_full(skb, data, data_end, pkt, udp_len, check))
		return NATFIX_CNT_OVERLAY_ERROR;
	if (slot)
		csum_delta_learn(slot, pkt, sent, *check, now);
	return NATFIX_CNT_OVERLAY_RECOMPUTED;
}

/* The counter for this packet; for a rewrite also *rw. */
static __always_inline int overlay_fix(struct __sk_buff *skb, struct overlay_rewrite *rw)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct natfix_pkt pkt;
	struct udphdr *udp;
	__u32 udp_len;
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
		return NATFIX_CNT_OVERLAY_ZEROED;
	}
	return overlay_recompute(skb, &pkt, udp, udp_len, &rw->check);
}

/*
 * The common case in one pass, for zero mode: a datagram of
 * natfix_udp4_plain()'s shape to a VXLAN port. For these packets it reaches
 * the verdict overlay_fix() would in half the instructions. Returns the
 * counter, or -1 when the packet is not of that shape.
 */
static __always_inline int overlay_zero_v4_fast(struct __sk_buff *skb)
{
	struct udphdr *udp;
	int gate;

	if (natfix_overlay_cfg.flags & NATFIX_OVERLAY_F_RECOMPUTE)
		return -1;
	udp = natfix_udp4_plain((void *)(long)skb->data, (void *)(long)skb->data_end);
	if (!udp)
		return -1;
	if (!overlay_port(udp->dest))
		return NATFIX_CNT_OVERLAY_NOT_VXLAN;
	gate = overlay_gate(skb);
	if (gate >= 0)
		return gate;
	if (OVERLAY_V4_UDP_OFF + bpf_ntohs(udp->len) > skb->len)
		return NATFIX_CNT_OVERLAY_MALFORMED;
	return NATFIX_CNT_OVERLAY_ZEROED;
}

/* A sampled rewrite event. Rare (see natfix_event_sampled()), so the writer
 * parses the packet again rather than be handed its addresses. */
static __always_inline void overlay_emit(struct __sk_buff *skb, __u32 counter)
{
	struct natfix_pkt pkt;

	if (natfix_parse_udp((void *)(long)skb->data, (void *)(long)skb->data_end, &pkt) == NATFIX_PARSE_UDP)
		natfix_emit(counter, &pkt, skb->ifindex, skb->len);
}

/* Count a rewrite and maybe sample it as an event. */
static __always_inline void overlay_count_rewrite(struct __sk_buff *skb, __u32 why)
{
	if (natfix_event_sampled(natfix_count_n(why, skb->len)))
		overlay_emit(skb, why);
}

/* Hand a rewrite to the cb-directed writer; without it, write with the helper
 * (which unclones only this packet). Returns only when the writer is absent. */
static __always_inline void overlay_write(struct __sk_buff *skb, struct overlay_rewrite *rw, int why)
{
	skb->cb[OVERLAY_CB_OFF] = rw->check_off;
	skb->cb[OVERLAY_CB_CHECK] = rw->check;
	skb->cb[OVERLAY_CB_COUNTER] = why;
	bpf_tail_call(skb, &overlay_writer, OVERLAY_WRITER_ANY);
	if (bpf_skb_store_bytes(skb, rw->check_off, &rw->check, sizeof(rw->check), BPF_F_RECOMPUTE_CSUM))
		natfix_count(NATFIX_CNT_OVERLAY_ERROR, skb->len);
	else
		overlay_count_rewrite(skb, why);
}

SEC("classifier")
int natfix_overlay_tc(struct __sk_buff *skb)
{
	struct overlay_rewrite rw;
	int why = overlay_zero_v4_fast(skb);

	if (why == NATFIX_CNT_OVERLAY_ZEROED) {
		bpf_tail_call(skb, &overlay_writer, OVERLAY_WRITER_V4_ZERO);
		/* Still here: no writer for this slot. */
		rw.check_off = OVERLAY_V4_CHECK_OFF;
		rw.check = 0;
		overlay_write(skb, &rw, why);
		return NATFIX_TC_NEXT;
	}
	if (why < 0) {
		why = overlay_fix(skb, &rw);
		if (overlay_is_rewrite(why)) {
			overlay_write(skb, &rw, why);
			return NATFIX_TC_NEXT;
		}
	}
	natfix_count(why, skb->len);
	/* Never drops: a packet it cannot fix is the stack's to judge. */
	return NATFIX_TC_NEXT;
}

/* Software decryption (esp_input) leaves CHECKSUM_NONE; only a NIC that
 * decrypts ESP may hand over CHECKSUM_COMPLETE, whose skb->csum must follow
 * the change. The loader sets the flag for such interfaces. */
static __always_inline void overlay_store(struct __sk_buff *skb, __u16 *check, __u16 new)
{
	__u16 old = *check;

	*check = new;
	if (natfix_overlay_cfg.flags & NATFIX_OVERLAY_F_CSUM_COMPLETE)
		bpf_csum_update(skb, (__u32)(__u16)~old + new);
}

/* Tail-called for packets natfix owns only: writes the checksum skb->cb names. */
SEC("classifier")
int natfix_overlay_write(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	/* The UDP header sits within 17 KiB (8 extension headers at most);
	 * the mask lets the verifier bound the offset below its 64 KiB limit. */
	__u16 *check = data + (skb->cb[OVERLAY_CB_OFF] & 0x7fff);

	if ((void *)(check + 1) > data_end) {
		natfix_count(NATFIX_CNT_OVERLAY_ERROR, skb->len);
		return NATFIX_TC_NEXT;
	}
	overlay_store(skb, check, skb->cb[OVERLAY_CB_CHECK]);
	overlay_count_rewrite(skb, skb->cb[OVERLAY_CB_COUNTER]);
	return NATFIX_TC_NEXT;
}

/* Tail-called for overlay_zero_v4_fast()'s packets: zeroes the checksum. */
SEC("classifier")
int natfix_overlay_write_v4z(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u16 *check = data + OVERLAY_V4_CHECK_OFF;

	if ((void *)(check + 1) > data_end) {
		natfix_count(NATFIX_CNT_OVERLAY_ERROR, skb->len);
		return NATFIX_TC_NEXT;
	}
	overlay_store(skb, check, 0);
	overlay_count_rewrite(skb, NATFIX_CNT_OVERLAY_ZEROED);
	return NATFIX_TC_NEXT;
}

char LICENSE[] SEC("license") = "GPL";
