// SPDX-License-Identifier: GPL-2.0-only
/*
 * guard_tc.bpf.c - tc ingress twin of guard_xdp.bpf.c, for devices where XDP
 * is not wanted (--guard-hook tc). Same decision, same counters.
 */
#include "natfix_common.h"
#include "natfix_counters.h"
#include "natfix_parse.h"
#include "natfix_guard.h"
#include "natfix_events.h"
#include "natfix_flow_cache.h"
#ifdef NATFIX_FLOW_CONNTRACK
#include "natfix_ct.h"
#else
#include "natfix_flow.h"
#endif

/* Linear data pulled when headers run into paged data: Ethernet, VLAN
 * tags, IPv6 and its extension headers, UDP. Headers past it are TOO_DEEP. */
#define GUARD_TC_PULL_LEN 1024

SEC("classifier")
int natfix_guard_tc(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct natfix_pkt pkt;
	int why;

	/* The kernel moved the outer tag into the skb: a VLAN id other than
	 * 0 is a VLAN device's (or dropped), priority tags are stripped. */
	if (skb->vlan_present && (skb->vlan_tci & 0x0fff)) {
		natfix_count(NATFIX_CNT_GUARD_OUT_OF_SCOPE, skb->len);
		return NATFIX_TC_NEXT;
	}
	why = guard_lookup(data, data_end, &pkt);
	if (why == NATFIX_CNT_GUARD_MALFORMED && natfix_tc_pull_headers(skb, GUARD_TC_PULL_LEN)) {
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		why = guard_lookup(data, data_end, &pkt);
		/* Still out of data, with more to come: headers past the pull. */
		if (why == NATFIX_CNT_GUARD_MALFORMED && natfix_tc_has_more(skb))
			why = guard_too_deep();
	}
	if (why == GUARD_NEED_FLOW) {
#ifdef NATFIX_FLOW_CONNTRACK
		why = guard_answer(NATFIX_CT_SOLICITED(bpf_skb_ct_lookup, skb, &pkt), &pkt);
#else
		why = guard_answer(flow_own_solicited(&pkt), &pkt);
#endif
		if (why != NATFIX_CNT_GUARD_PASS_SOLICITED)
			natfix_emit(why, &pkt, skb->ifindex, skb->len);
	}
	natfix_count(why, skb->len);
	return guard_drops(why) ? TC_ACT_SHOT : NATFIX_TC_NEXT;
}

char LICENSE[] SEC("license") = "GPL";
