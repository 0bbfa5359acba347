/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * natfix_clock.h - the cheap clock for per-packet windows.
 *
 * The verifier inlines bpf_jiffies64() into one load of jiffies_64 on 64-bit
 * JITs; bpf_ktime_get_{,coarse_}ns() stay calls (two returns each, costly
 * under return-thunk mitigations). Windows measured in jiffies need CONFIG_HZ,
 * which the loader reads from clock_getres(CLOCK_MONOTONIC_COARSE) (its
 * resolution is one tick) and sets before load. 0 = unknown: features that
 * need it fall back as their headers say.
 */
#ifndef NATFIX_CLOCK_H
#define NATFIX_CLOCK_H

#include "natfix_common.h"

const volatile __u32 natfix_hz __weak = 0;

#endif /* NATFIX_CLOCK_H */
