//! `natfix trace` as asked for.

use std::time::Duration;

use super::IfaceName;

/// Packets a trace follows unless `--count` says otherwise (replies not counted).
pub const DEFAULT_TRACE_COUNT: u64 = 1;
/// Seconds a trace waits for packets unless `--timeout` says otherwise.
pub const DEFAULT_TRACE_TIMEOUT_SECS: u64 = 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceSpec {
    /// FILTER as written (checked by the trace's parser).
    pub filter: String,
    /// `--netns` (repeatable), as written; empty: the default set.
    pub netns: Vec<String>,
    pub iface: Option<IfaceName>,
    pub count: u64,
    pub timeout: Duration,
    pub json: bool,
}
