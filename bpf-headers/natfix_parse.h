/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * natfix_parse.h - packet parsing shared by the XDP and tc programs.
 *
 * Contract: natfix_parse_udp() reads only between data and data_end, checks
 * bounds once per header before reading it, never writes the packet, and
 * returns an enum natfix_parse_result. On NATFIX_PARSE_UDP the struct
 * natfix_pkt is filled; otherwise its contents are unspecified.
 *
 * Decisions (mirrored by the Rust model in tests/src/model/parse.rs). The
 * rule: a datagram the kernel would hand to UDP and conntrack is judged,
 * whatever its encapsulation; what the walk cannot reach is TOO_DEEP, which
 * the guard drops (legitimate traffic is never that deep):
 *  - 802.1Q/802.1ad tags with VLAN id 0 (priority tags) are walked, up to
 *    NATFIX_MAX_VLAN_TAGS: the kernel strips them and delivers the frame as
 *    untagged. A tag with another id is OTHER: the frame belongs to a VLAN
 *    device (natfix belongs there) or the kernel drops it (no such device).
 *    More priority tags than walked: TOO_DEEP.
 *  - IPv4: version must be 4, IHL >= 5, total length >= header length, and the
 *    header must fit. Options are skipped. A non-first fragment of UDP is
 *    FRAGMENT (its ports are unknowable); a first fragment is parsed as UDP,
 *    so dropping it makes reassembly fail and conntrack never sees the datagram.
 *  - IPv6: up to NATFIX_MAX_EXTHDRS extension headers (hop-by-hop, routing,
 *    destination options, fragment, AH) are walked, and the header after the
 *    last of them is still looked at; a longer chain is TOO_DEEP (the kernel
 *    accepts chains of any length).
 *  - UDP: the 8-byte header must fit and its length field must be >= 8.
 */
#ifndef NATFIX_PARSE_H
#define NATFIX_PARSE_H

#include "natfix_common.h"

#define NATFIX_MAX_EXTHDRS 16
#define NATFIX_MAX_VLAN_TAGS 4

enum natfix_parse_result {
	NATFIX_PARSE_UDP = 0,   /* UDP over IPv4/IPv6: natfix_pkt filled */
	NATFIX_PARSE_OTHER,     /* not IP, not UDP, or tagged for a VLAN device */
	NATFIX_PARSE_FRAGMENT,  /* UDP fragment other than the first */
	NATFIX_PARSE_MALFORMED, /* truncated or invalid headers */
	NATFIX_PARSE_TOO_DEEP,  /* more VLAN tags or IPv6 extension headers than walked */
};

/* An 802.1Q/802.1ad tag (the kernel's struct vlan_hdr is not uapi). */
struct natfix_vlan_hdr {
	__be16 tci;
	__be16 encapsulated_proto;
};

struct natfix_pkt {
	__u32 saddr[4]; /* network byte order; IPv4 uses [0] */
	__u32 daddr[4];
	__u16 sport;    /* network byte order */
	__u16 dport;
	__u16 l3_off;   /* offset of the IP header from data */
	__u16 l4_off;   /* offset of the UDP header from data */
	__u8 family;    /* NATFIX_FAMILY_V4 or _V6 */
};

static __always_inline int natfix_parse_udp_hdr(void *data, void *data_end, __u32 off,
						struct natfix_pkt *pkt)
{
	struct udphdr *udp = data + off;
	__u16 sport, dport;

	if ((void *)(udp + 1) > data_end)
		return NATFIX_PARSE_MALFORMED;
	if (bpf_ntohs(udp->len) < sizeof(*udp))
		return NATFIX_PARSE_MALFORMED;
	sport = udp->source;
	dport = udp->dest;
	/* Keep the loaded values: clang may otherwise re-read the packet later
	 * through a pointer the verifier no longer knows to be in bounds. */
	asm volatile("" : "+r"(sport), "+r"(dport));
	pkt->sport = sport;
	pkt->dport = dport;
	pkt->l4_off = off;
	return NATFIX_PARSE_UDP;
}

/* An IPv4 packet's addresses in natfix_pkt's form (words 1-3 zero). */
static __always_inline void natfix_pkt_set_v4(struct natfix_pkt *pkt, __u32 saddr, __u32 daddr)
{
	pkt->family = NATFIX_FAMILY_V4;
	pkt->saddr[0] = saddr;
	pkt->daddr[0] = daddr;
	pkt->saddr[1] = pkt->saddr[2] = pkt->saddr[3] = 0;
	pkt->daddr[1] = pkt->daddr[2] = pkt->daddr[3] = 0;
}

static __always_inline int natfix_parse_ipv4(void *data, void *data_end, __u32 off,
					     struct natfix_pkt *pkt)
{
	struct iphdr *iph = data + off;
	__u32 hlen;

	if ((void *)(iph + 1) > data_end)
		return NATFIX_PARSE_MALFORMED;
	if (iph->version != 4 || iph->ihl < 5)
		return NATFIX_PARSE_MALFORMED;
	hlen = iph->ihl * 4;
	if (bpf_ntohs(iph->tot_len) < hlen)
		return NATFIX_PARSE_MALFORMED;
	if (data + off + hlen > data_end)
		return NATFIX_PARSE_MALFORMED;
	if (iph->protocol != IPPROTO_UDP)
		return NATFIX_PARSE_OTHER;
	if (iph->frag_off & bpf_htons(0x1fff))
		return NATFIX_PARSE_FRAGMENT;

	natfix_pkt_set_v4(pkt, iph->saddr, iph->daddr);
	pkt->l3_off = off;
	return natfix_parse_udp_hdr(data, data_end, off + hlen, pkt);
}

struct natfix_ipv6_opt_hdr {
	__u8 nexthdr;
	__u8 hdrlen;
};

struct natfix_ipv6_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

static __always_inline int natfix_parse_ipv6(void *data, void *data_end, __u32 off,
					     struct natfix_pkt *pkt)
{
	struct ipv6hdr *ip6 = data + off;
	__u8 nexthdr;
	int i;

	if ((void *)(ip6 + 1) > data_end)
		return NATFIX_PARSE_MALFORMED;
	if (ip6->version != 6)
		return NATFIX_PARSE_MALFORMED;

	pkt->family = NATFIX_FAMILY_V6;
	__builtin_memcpy(pkt->saddr, &ip6->saddr, 16);
	__builtin_memcpy(pkt->daddr, &ip6->daddr, 16);
	pkt->l3_off = off;
	nexthdr = ip6->nexthdr;
	off += sizeof(*ip6);

#pragma unroll
	for (i = 0; i < NATFIX_MAX_EXTHDRS; i++) {
		switch (nexthdr) {
		case IPPROTO_UDP:
			return natfix_parse_udp_hdr(data, data_end, off, pkt);
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS: {
			struct natfix_ipv6_opt_hdr *opt = data + off;

			if ((void *)(opt + 1) > data_end)
				return NATFIX_PARSE_MALFORMED;
			nexthdr = opt->nexthdr;
			off += (opt->hdrlen + 1) * 8;
			break;
		}
		case IPPROTO_AH: {
			struct natfix_ipv6_opt_hdr *ah = data + off;

			if ((void *)(ah + 1) > data_end)
				return NATFIX_PARSE_MALFORMED;
			nexthdr = ah->nexthdr;
			off += (ah->hdrlen + 2) * 4;
			break;
		}
		case IPPROTO_FRAGMENT: {
			struct natfix_ipv6_frag_hdr *frag = data + off;

			if ((void *)(frag + 1) > data_end)
				return NATFIX_PARSE_MALFORMED;
			if (frag->frag_off & bpf_htons(0xfff8))
				return frag->nexthdr == IPPROTO_UDP ? NATFIX_PARSE_FRAGMENT
								    : NATFIX_PARSE_OTHER;
			nexthdr = frag->nexthdr;
			off += sizeof(*frag);
			break;
		}
		default:
			return NATFIX_PARSE_OTHER;
		}
	}
	/* The header after the last one walked. */
	switch (nexthdr) {
	case IPPROTO_UDP:
		return natfix_parse_udp_hdr(data, data_end, off, pkt);
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_FRAGMENT:
		return NATFIX_PARSE_TOO_DEEP;
	default:
		return NATFIX_PARSE_OTHER;
	}
}

static __always_inline int natfix_is_vlan_proto(__be16 proto)
{
	return proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD);
}

/* Parse an Ethernet frame down to its UDP header. */
static __always_inline int natfix_parse_udp(void *data, void *data_end, struct natfix_pkt *pkt)
{
	struct ethhdr *eth = data;
	__u32 off = sizeof(*eth);
	__be16 proto;
	int i;

	if ((void *)(eth + 1) > data_end)
		return NATFIX_PARSE_MALFORMED;
	proto = eth->h_proto;
#pragma unroll
	for (i = 0; i < NATFIX_MAX_VLAN_TAGS; i++) {
		struct natfix_vlan_hdr *vh = data + off;

		if (!natfix_is_vlan_proto(proto))
			break;
		if ((void *)(vh + 1) > data_end)
			return NATFIX_PARSE_MALFORMED;
		if (vh->tci & bpf_htons(0x0fff))
			return NATFIX_PARSE_OTHER;
		proto = vh->encapsulated_proto;
		off += sizeof(*vh);
	}
	switch (proto) {
	case bpf_htons(ETH_P_IP):
		return natfix_parse_ipv4(data, data_end, off, pkt);
	case bpf_htons(ETH_P_IPV6):
		return natfix_parse_ipv6(data, data_end, off, pkt);
	case bpf_htons(ETH_P_8021Q):
	case bpf_htons(ETH_P_8021AD):
		return NATFIX_PARSE_TOO_DEEP;
	default:
		return NATFIX_PARSE_OTHER;
	}
}

/*
 * The common shape in one pass, for hot paths that decide it in registers:
 * an untagged frame carrying an IPv4 datagram without options, in one
 * fragment, with a whole UDP header. Returns that header (the IP header is at
 * data + 14), or NULL for any other shape, which natfix_parse_udp() then
 * decides. For the shapes it accepts, natfix_parse_udp() returns
 * NATFIX_PARSE_UDP with the same offsets (the differential tests hold both
 * paths to the Rust model).
 */
static __always_inline struct udphdr *natfix_udp4_plain(void *data, void *data_end)
{
	struct iphdr *iph = data + sizeof(struct ethhdr);
	struct udphdr *udp = (void *)(iph + 1);

	if ((void *)(udp + 1) > data_end)
		return NULL;
	/* EtherType IPv4; version 4 with a 20-byte header; UDP and not a
	 * fragment (frag_off, ttl and protocol tested as one word). */
	if (*(__u16 *)(data + offsetof(struct ethhdr, h_proto)) != bpf_htons(ETH_P_IP) ||
	    *(__u8 *)iph != 0x45 ||
	    (*(__u32 *)&iph->frag_off & bpf_htonl(0x1fff00ff)) != bpf_htonl(IPPROTO_UDP))
		return NULL;
	if (bpf_ntohs(iph->tot_len) < sizeof(*iph) || bpf_ntohs(udp->len) < sizeof(*udp))
		return NULL;
	return udp;
}

/* tc only. Whether the packet goes on past the linear data: a parse that
 * still ran out of data then did not see the headers the kernel will. */
static __always_inline int natfix_tc_has_more(struct __sk_buff *skb)
{
	return skb->len > (__u32)((long)skb->data_end - (long)skb->data);
}

/*
 * tc only. A parse that ran out of linear data (NATFIX_PARSE_MALFORMED) on a
 * packet that goes on in paged data: pulls up to `want` bytes into the linear
 * area and says whether parsing again can see more. Called only then, never
 * up front: on a cloned skb (every TCP segment: the sender keeps the original
 * to retransmit) or one short of tailroom, bpf_skb_pull_data() reallocates
 * the head and copies it, and headers normally sit in the linear area.
 */
static __always_inline int natfix_tc_pull_headers(struct __sk_buff *skb, __u32 want)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (skb->len <= data_end - data)
		return 0;
	return bpf_skb_pull_data(skb, skb->len < want ? skb->len : want) == 0;
}

#endif /* NATFIX_PARSE_H */
