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

#endif /* NATFIX_CSUM_H */
