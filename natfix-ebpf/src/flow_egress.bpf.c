// SPDX-License-Identifier: GPL-2.0-only
/*
 * flow_egress.bpf.c - tc egress: learn the flows the guard must let back in.
 * tc egress runs after netfilter POSTROUTING, so it sees the post-SNAT tuple
 * the reply will carry. Never changes or drops a packet.
 */
#include "natfix_common.h"
#include "natfix_counters.h"
#include "natfix_parse.h"
#include "natfix_guard.h"
#include "natfix_flow.h"

#define FLOW_TC_PULL_LEN 256

SEC("classifier")
int natfix_flow_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct natfix_flow_key key = {};
	struct natfix_pkt pkt;
	__u64 now;
	int why;

	why = natfix_parse_udp(data, data_end, &pkt);
	if (why == NATFIX_PARSE_MALFORMED && natfix_tc_pull_headers(skb, FLOW_TC_PULL_LEN)) {
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		why = natfix_parse_udp(data, data_end, &pkt);
	}
	if (why != NATFIX_PARSE_UDP || !guard_port_learned(pkt.sport)) {
		natfix_count(NATFIX_CNT_FLOW_OUT_OF_SCOPE, skb->len);
		return NATFIX_TC_NEXT;
	}
	now = bpf_ktime_get_coarse_ns();
	flow_key_fill(&key, pkt.family, pkt.saddr, pkt.sport, pkt.daddr, pkt.dport);
	why = flow_own_learn_key(&key, now);
	if (natfix_guard_cfg.flags & NATFIX_GUARD_F_ENDPOINT_INDEP) {
		flow_key_wildcard(&key);
		flow_own_learn_key(&key, now);
	}
	natfix_count(why, skb->len);
	return NATFIX_TC_NEXT;
}

char LICENSE[] SEC("license") = "GPL";
