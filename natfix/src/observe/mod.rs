//! What operators read back from attachments: counters (`stats`), the
//! Prometheus exposition (`metrics`) and sampled events (`events`).

pub mod events;
pub mod metrics;
pub mod state;
pub mod stats;
