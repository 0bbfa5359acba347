/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * natfix_abi.h - the ABI between natfix's eBPF programs and userspace.
 *
 * Everything here is mirrored by #[repr(C)] types in natfix-ebpf/src/abi.rs,
 * which asserts the sizes at compile time. Keep the two in sync.
 * Counter slots are a stable ABI: never renumber, never reuse a retired slot.
 */
#ifndef NATFIX_ABI_H
#define NATFIX_ABI_H

#include <linux/types.h>

/* One slot per reason a packet was handled the way it was. */
enum natfix_counter {
	/* guard (ingress, XDP or tc) */
	NATFIX_CNT_GUARD_OUT_OF_SCOPE      = 0,  /* not UDP to a guarded port: passed untouched */
	NATFIX_CNT_GUARD_PASS_SOLICITED    = 1,  /* in scope, belongs to a known flow */
	NATFIX_CNT_GUARD_DROP_UNSOLICITED  = 2,  /* in scope, unknown flow: dropped */
	NATFIX_CNT_GUARD_WOULD_DROP        = 3,  /* as above, but --dry-run: passed */
	NATFIX_CNT_GUARD_EXEMPT_PORT       = 4,  /* destination port in --allow-port */
	NATFIX_CNT_GUARD_EXEMPT_SRC        = 5,  /* source address in --allow-src */
	NATFIX_CNT_GUARD_MALFORMED         = 6,  /* headers truncated or invalid: passed */
	NATFIX_CNT_GUARD_FRAGMENT          = 7,  /* non-first IP fragment: passed */
	/* flow learner (tc egress, own flow table) */
	NATFIX_CNT_FLOW_LEARNED            = 8,  /* new flow entry */
	NATFIX_CNT_FLOW_REFRESHED          = 9,  /* existing entry's timestamp moved */
	NATFIX_CNT_FLOW_LEARN_FAILED       = 10, /* map update failed */
	NATFIX_CNT_FLOW_OUT_OF_SCOPE       = 11, /* egress packet not UDP from a guarded port */
	/* guard, continued */
	NATFIX_CNT_GUARD_DROP_TOO_DEEP     = 12, /* more VLAN tags or IPv6 extension headers than the parser
						    walks (or, at tc, headers past what it pulls): dropped
						    (would_drop under --dry-run) */
	/* 13..15 reserved for the guard */
	/* overlay checksum fixer (tc ingress on the underlay) */
	NATFIX_CNT_OVERLAY_ZEROED          = 16, /* decrypted VXLAN: UDP checksum set to 0 */
	NATFIX_CNT_OVERLAY_RECOMPUTED      = 17, /* decrypted VXLAN: UDP checksum recomputed by summing the datagram */
	NATFIX_CNT_OVERLAY_CLEARTEXT       = 18, /* VXLAN without xfrm secpath: untouched */
	NATFIX_CNT_OVERLAY_NOT_VXLAN       = 19, /* not UDP to a VXLAN port: untouched */
	NATFIX_CNT_OVERLAY_MALFORMED       = 20, /* headers or UDP length invalid: untouched */
	NATFIX_CNT_OVERLAY_ERROR           = 21, /* a helper failed: untouched */
	NATFIX_CNT_OVERLAY_OTHER_SA        = 22, /* decrypted by an SA with another reqid: untouched */
	NATFIX_CNT_OVERLAY_RECOMPUTED_DELTA = 23, /* decrypted VXLAN: checksum updated with the learned address delta */
	/* 24..31 reserved for the overlay checksum fixer */
	NATFIX_CNT_MAX                     = 32,
};

struct natfix_counter_value {
	__u64 packets;
	__u64 bytes;
};

#define NATFIX_MAX_PORT_RANGES 16

struct natfix_port_range {
	__u16 first; /* host byte order, inclusive */
	__u16 last;  /* host byte order, inclusive */
};

/* natfix_guard_config.flags */
#define NATFIX_GUARD_F_DRY_RUN        (1U << 0) /* count, never drop */
#define NATFIX_GUARD_F_ENDPOINT_INDEP (1U << 1) /* RFC 4787 endpoint-independent filtering */
#define NATFIX_GUARD_F_ALLOW_PORTS    (1U << 2) /* guard_allow_ports has entries */
#define NATFIX_GUARD_F_ALLOW_SRC      (1U << 3) /* guard_allow_src{4,6} have entries */

/* Set by the loader as a `const volatile` global before load (verifier prunes what is off). */
struct natfix_guard_config {
	struct natfix_port_range ranges[NATFIX_MAX_PORT_RANGES];
	__u32 nr_ranges;
	__u32 flags;
	__u64 flow_timeout_ns; /* idle time after which an own-table flow no longer admits replies */
};

#define NATFIX_MAX_VXLAN_PORTS 8

/* natfix_overlay_config.flags */
#define NATFIX_OVERLAY_F_RECOMPUTE      (1U << 0) /* recompute (else zero IPv4, recompute IPv6) */
#define NATFIX_OVERLAY_F_MATCH_REQID    (1U << 1) /* only packets decrypted by SAs with `reqid` */
#define NATFIX_OVERLAY_F_NO_SECPATH     (1U << 2) /* TEST BUILDS ONLY: skip the xfrm secpath gate */
#define NATFIX_OVERLAY_F_CSUM_COMPLETE  (1U << 3) /* ESP hardware offload: decrypted packets may be CHECKSUM_COMPLETE */

struct natfix_overlay_config {
	__u16 vxlan_ports[NATFIX_MAX_VXLAN_PORTS]; /* host byte order */
	__u32 nr_ports;
	__u32 flags;
	__u32 reqid;
	/* Recompute: how long a checksum delta learned for an address pair is
	 * trusted before the next datagram is summed in full (0 = always sum). */
	__u32 delta_window_jiffies;
};

/* A sampled event (ring buffer `natfix_events`): a drop or a rewrite. */
struct natfix_event {
	__u64 ts_ns;          /* bpf_ktime_get_coarse_ns() */
	__u32 counter;        /* enum natfix_counter: the reason */
	__u32 ifindex;        /* receiving interface */
	__u32 saddr[4];       /* network byte order; IPv4 uses [0] */
	__u32 daddr[4];
	__u16 sport;          /* network byte order */
	__u16 dport;
	__u32 len;            /* packet length */
	__u8 family;          /* NATFIX_FAMILY_V4 or _V6 */
	__u8 pad[7];
};

#define NATFIX_FAMILY_V4 4
#define NATFIX_FAMILY_V6 6

/*
 * Key of the own flow table, as the reply will carry it on ingress:
 * local = our (post-SNAT) address and port, remote = the peer's.
 * IPv4 addresses use the first word; the other words are zero.
 * With endpoint-independent filtering, entries with a zero remote also exist.
 */
struct natfix_flow_key {
	__u32 local_addr[4];  /* network byte order */
	__u32 remote_addr[4]; /* network byte order */
	__u16 local_port;     /* network byte order */
	__u16 remote_port;    /* network byte order */
	__u8 family;          /* NATFIX_FAMILY_V4 or _V6 */
	__u8 pad[3];
};

struct natfix_flow_value {
	__u64 last_seen_ns; /* CLOCK_MONOTONIC_COARSE, as bpf_ktime_get_coarse_ns() */
};

/* Key of the guard_allow_src{4,6} LPM tries. */
struct natfix_lpm_v4 {
	__u32 prefixlen;
	__u32 addr;
};

struct natfix_lpm_v6 {
	__u32 prefixlen;
	__u32 addr[4];
};

#endif /* NATFIX_ABI_H */
