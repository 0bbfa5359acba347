/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * natfix_csum.h - Internet checksum of a UDP datagram, for the overlay fixer.
 *
 * Contract: udp_csum_full() sums the pseudo-header and `udp_len` bytes from
 * the UDP header (its checksum field taken as zero): whole chunks straight
 * from linear packet memory, the tail via bpf_skb_load_bytes() into a zeroed
 * buffer, and stores in *out the value to write (0xffff instead of 0,
 * RFC 768). Returns -1 when the datagram does not lie within
 * [data, data_end) or exceeds NATFIX_CSUM_MAX_LEN.
 */
#ifndef NATFIX_CSUM_H
#define NATFIX_CSUM_H

#include "natfix_common.h"
#include "natfix_parse.h"

#define NATFIX_CSUM_CHUNK 256
/* 16 KiB covers jumbo frames; the verifier caps packet offsets at 64 KiB,
 * and the UDP header may itself sit ~14 KiB deep behind IPv6 extensions. */
#define NATFIX_CSUM_MAX_CHUNKS 64
#define NATFIX_CSUM_MAX_LEN (NATFIX_CSUM_CHUNK * NATFIX_CSUM_MAX_CHUNKS)

static __always_inline __u16 csum_fold32(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Pseudo-header sum (RFC 768 / RFC 8200 8.1), as a 32-bit partial sum. */
static __always_inline __s64 udp_pseudo_sum(const struct natfix_pkt *pkt, __u32 udp_len)
{
	__u32 buf[10] = {};

	if (pkt->family == NATFIX_FAMILY_V4) {
		buf[0] = pkt->saddr[0];
		buf[1] = pkt->daddr[0];
		buf[2] = bpf_htonl((IPPROTO_UDP << 16) | udp_len);
		return bpf_csum_diff(NULL, 0, buf, 12, 0);
	}
	__builtin_memcpy(&buf[0], pkt->saddr, 16);
	__builtin_memcpy(&buf[4], pkt->daddr, 16);
	buf[8] = bpf_htonl(udp_len);
	buf[9] = bpf_htonl(IPPROTO_UDP);
	return bpf_csum_diff(NULL, 0, buf, 40, 0);
}

static __always_inline int udp_csum_full(struct __sk_buff *skb, void *data, void *data_end,
					 const struct natfix_pkt *pkt, __u32 udp_len, __u16 *out)
{
	__u8 *p = data + pkt->l4_off;
	__u8 tail[NATFIX_CSUM_CHUNK] = {};
	__u32 done = 0, rest;
	__s64 sum = udp_pseudo_sum(pkt, udp_len);
	__u64 acc;
	int i;

	if (sum < 0 || udp_len > NATFIX_CSUM_MAX_LEN || udp_len < 8)
		return -1;
	acc = (__u64)sum;
	/* Whole chunks straight from the packet. */
	for (i = 0; i < NATFIX_CSUM_MAX_CHUNKS; i++) {
		__u8 *chunk = p + done;

		if (done + NATFIX_CSUM_CHUNK > udp_len)
			break;
		if ((void *)(chunk + NATFIX_CSUM_CHUNK) > data_end)
			return -1;
		sum = bpf_csum_diff(NULL, 0, (void *)chunk, NATFIX_CSUM_CHUNK, 0);
		if (sum < 0)
			return -1;
		acc += (__u64)sum;
		done += NATFIX_CSUM_CHUNK;
	}
	/* The tail, copied into a zeroed buffer padded to a multiple of 4:
	 * zero padding at the end does not change the sum. */
	rest = udp_len - done;
	if (rest) {
		/* ((rest - 1) & 255) + 1 == rest here, and lets every verifier see
		 * 1 <= size <= 256, which a plain `if (rest)` does not prove on 6.1. */
		rest = ((rest - 1) & (NATFIX_CSUM_CHUNK - 1)) + 1;
		if (bpf_skb_load_bytes(skb, pkt->l4_off + done, tail, rest))
			return -1;
		sum = bpf_csum_diff(NULL, 0, (void *)tail, (rest + 3) & ~3U, 0);
		if (sum < 0)
			return -1;
		acc += (__u64)sum;
	}
	/* The datagram's own checksum field was summed: take it back out. */
	{
		struct udphdr *udp = data + pkt->l4_off;

		if ((void *)(udp + 1) > data_end)
			return -1;
		acc += (__u16)~udp->check;
	}
	*out = csum_fold32(acc);
	if (*out == 0)
		*out = 0xffff;
	return 0;
}

/*
 * Learned deltas. Behind a 1:1 NAT every datagram of one address pair carries
 * a checksum off by the same amount: the pseudo-header difference between the
 * addresses it was sealed with and those it arrives with. ESP authenticated
 * the datagram, so the sent checksum is exactly what the sender computed.
 * After one datagram is summed in full, delta = ~right + sent (ones'
 * complement), and the next datagrams of the pair need only
 * right' = ~(~sent' + delta). Per-CPU slots, direct-mapped by address pair;
 * a delta is trusted for delta_window_jiffies, then re-learned, so a NAT that
 * changes its mapping costs at most one window of bad checksums.
 * A sent checksum of 0 (IPv4: none) teaches nothing and is always summed.
 */
#define NATFIX_CSUM_DELTA_BITS 8
#define NATFIX_CSUM_DELTA_SLOTS (1U << NATFIX_CSUM_DELTA_BITS)

struct natfix_csum_delta_slot {
	__u32 saddr[4];
	__u32 daddr[4];
	__u64 learned_jiffies;
	__u32 delta;
	__u32 family;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NATFIX_CSUM_DELTA_SLOTS);
	__type(key, __u32);
	__type(value, struct natfix_csum_delta_slot);
} overlay_csum_delta SEC(".maps") __weak;

static __always_inline struct natfix_csum_delta_slot *csum_delta_slot(const struct natfix_pkt *pkt)
{
	__u32 h = pkt->saddr[0] ^ pkt->saddr[3] ^ pkt->daddr[0] ^ pkt->daddr[3];
	__u32 idx = (h * 0x9e3779b1U) >> (32 - NATFIX_CSUM_DELTA_BITS);

	return bpf_map_lookup_elem(&overlay_csum_delta, &idx);
}

static __always_inline int csum_delta_same_pair(const struct natfix_csum_delta_slot *slot,
						const struct natfix_pkt *pkt)
{
	/* 32-bit words: the packet summary on the stack is only 4-aligned. */
	const __u32 *a = slot->saddr, *b = pkt->saddr, *c = slot->daddr, *d = pkt->daddr;

	return slot->family == pkt->family && a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] &&
	       c[0] == d[0] && c[1] == d[1] && c[2] == d[2] && c[3] == d[3];
}

static __always_inline void csum_delta_learn(struct natfix_csum_delta_slot *slot, const struct natfix_pkt *pkt,
					     __u16 sent, __u16 right, __u64 now_jiffies)
{
	__builtin_memcpy(slot->saddr, pkt->saddr, sizeof(slot->saddr));
	__builtin_memcpy(slot->daddr, pkt->daddr, sizeof(slot->daddr));
	slot->family = pkt->family;
	slot->delta = (__u32)(__u16)~right + sent;
	slot->learned_jiffies = now_jiffies;
}

/* The checksum to write, from the sent one and a learned delta; 0 goes out as 0xffff. */
static __always_inline __u16 csum_delta_apply(__u16 sent, __u32 delta)
{
	__u16 right = csum_fold32((__u64)(__u16)~sent + delta);

	return right ? right : 0xffff;
}

#endif /* NATFIX_CSUM_H */
