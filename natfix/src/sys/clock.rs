//! Clocks: the kernel's coarse monotonic clock (what the data plane stamps
//! events and flows with) turned into wall-clock time, and RFC 3339 text.

use std::time::{SystemTime, UNIX_EPOCH};

/// `CLOCK_MONOTONIC_COARSE` in ns: the clock of `bpf_ktime_get_coarse_ns()`.
#[must_use]
pub fn monotonic_coarse_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).unwrap_or(nix::sys::time::TimeSpec::new(0, 0));
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}

/// The wall-clock time (ns since the Unix epoch) of a `CLOCK_MONOTONIC_COARSE` stamp.
#[must_use]
pub fn wall_ns_of_monotonic(stamp_ns: u64) -> u128 {
    let now_wall = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let ago = u128::from(monotonic_coarse_ns().saturating_sub(stamp_ns));
    now_wall.saturating_sub(ago)
}

/// `2026-12-07T03:04:05.678Z` for ns since the epoch (UTC, milliseconds).
#[must_use]
pub fn rfc3339(epoch_ns: u128) -> String {
    let since = std::time::Duration::from_nanos(u64::try_from(epoch_ns).unwrap_or(u64::MAX));
    humantime::format_rfc3339_millis(UNIX_EPOCH + since).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_796_612_645_678_000_000), "2026-12-07T03:04:05.678Z");
    }

    #[test]
    fn a_fresh_stamp_is_now() {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let of_now = wall_ns_of_monotonic(monotonic_coarse_ns());
        assert!(wall.abs_diff(of_now) < 100_000_000, "{wall} vs {of_now}");
    }
}
