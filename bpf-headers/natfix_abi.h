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

/*
 * Configuration comes in two kinds. What the verifier may prune on is fixed
 * at load: `const volatile` globals (natfix_guard_cfg, natfix_overlay_cfg).
 * What an operator changes on a running attachment (`natfix set`) lives in
 * maps the loader fills before attach and userspace rewrites live:
 * guard_ports, guard_settings, the allow-src tries, overlay_settings and
 * natfix_event_rate.
 */

/* natfix_guard_config.flags (fixed at load) */
#define NATFIX_GUARD_F_ENDPOINT_INDEP (1U << 1) /* RFC 4787 endpoint-independent filtering */

struct natfix_guard_config {
	__u32 flags;
	__u32 pad;
};

/* natfix_guard_settings.flags (live) */
#define NATFIX_GUARD_S_DRY_RUN   (1U << 0) /* count, never drop */
#define NATFIX_GUARD_S_ALLOW_SRC (1U << 1) /* guard_allow_src{4,6} have entries */

/* The one entry of the guard_settings map. */
struct natfix_guard_settings {
	__u32 flags;
	__u32 pad;
	__u64 flow_timeout_ns; /* idle time after which an own-table flow no longer admits replies */
};

/*
 * guard_ports: three bit planes, each a bit per port (port p is bit p % 64
 * of word p / 64), NATFIX_PORT_WORDS words a plane. A plane's words are
 * written whole by userspace (under natfix's change lock); the programs only
 * read them, so a reader sees a word before or after a change, never torn.
 */
#define NATFIX_PORT_WORDS 1024
#define NATFIX_PORT_PLANE_GUARDED 0 /* ingress: UDP to the port is judged */
#define NATFIX_PORT_PLANE_EXEMPT  1 /* ingress: new flows to the port are admitted (--allow-port) */
#define NATFIX_PORT_PLANE_LEARN   2 /* egress: flows from the port are learned (own table) */
#define NATFIX_PORT_PLANES 3

#define NATFIX_MAX_VXLAN_PORTS 8

/* natfix_overlay_config.flags (fixed at load) */
#define NATFIX_OVERLAY_F_RECOMPUTE      (1U << 0) /* recompute (else zero IPv4, recompute IPv6) */
#define NATFIX_OVERLAY_F_NO_SECPATH     (1U << 2) /* TEST BUILDS ONLY: skip the xfrm secpath gate */
#define NATFIX_OVERLAY_F_CSUM_COMPLETE  (1U << 3) /* ESP hardware offload: decrypted packets may be CHECKSUM_COMPLETE */

struct natfix_overlay_config {
	__u32 flags;
	/* Recompute: how long a checksum delta learned for an address pair is
	 * trusted before the next datagram is summed in full (0 = always sum). */
	__u32 delta_window_jiffies;
};

/* natfix_overlay_settings.flags (live) */
#define NATFIX_OVERLAY_S_MATCH_REQID (1U << 0) /* only packets decrypted by SAs with `reqid` */

/* The one entry of the overlay_settings map. */
struct natfix_overlay_settings {
	__u16 vxlan_ports[NATFIX_MAX_VXLAN_PORTS]; /* host byte order */
	__u32 nr_ports;
	__u32 flags;
	__u32 reqid;
	__u32 pad;
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
