//! What operators read back from attachments: counters (`stats`), the
//! Prometheus exposition (`metrics`), sampled events (`events`), the own flow
//! table's occupancy (`flow_table`) and the kernel-checked state (`state`).

pub mod events;
pub mod flow_table;
pub mod metrics;
pub mod state;
pub mod stats;
