// SPDX-License-Identifier: GPL-2.0-only
/*
 * guard_xdp.bpf.c - XDP: drop unsolicited UDP to guarded ports before the
 * stack (and conntrack) allocates anything for it. Attached to the external
 * interface. Built twice: own flow table, or -DNATFIX_FLOW_CONNTRACK.
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

SEC("xdp")
int natfix_guard_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 len = data_end - data;
	struct natfix_pkt pkt;
	int why = guard_lookup(data, data_end, &pkt);

	if (why == GUARD_NEED_FLOW) {
#ifdef NATFIX_FLOW_CONNTRACK
		why = guard_answer(NATFIX_CT_SOLICITED(bpf_xdp_ct_lookup, ctx, &pkt), &pkt);
#else
		why = guard_answer(flow_own_solicited(&pkt), &pkt);
#endif
		if (why != NATFIX_CNT_GUARD_PASS_SOLICITED)
			natfix_emit(why, &pkt, ctx->ingress_ifindex, len);
	}
	natfix_count(why, len);
	return guard_drops(why) ? XDP_DROP : XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
