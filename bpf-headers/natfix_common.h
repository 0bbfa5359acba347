/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * natfix_common.h - includes and small definitions every natfix program needs.
 * Kernel UAPI and libbpf headers come from Debian (linux-libc-dev, libbpf-dev).
 */
#ifndef NATFIX_COMMON_H
#define NATFIX_COMMON_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "natfix_abi.h"

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

/* tcx/cls_act verdict that lets later programs and the stack see the packet. */
#define NATFIX_TC_NEXT TC_ACT_UNSPEC

#endif /* NATFIX_COMMON_H */
