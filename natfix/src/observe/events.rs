//! Sampled events of attachments: `natfix monitor` streams them, and
//! `natfix attach --log-events` logs them. A ring buffer has one reader.

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use tokio::io::unix::AsyncFd;

use crate::{
    abi::{Counter, Event},
    pins::{self, PinDir},
    record::AttachmentMeta,
    sys::clock,
};

/// One event, as printed (`--json`: one object per line; stable field names).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EventRecord {
    pub iface: String,
    pub netns: String,
    /// `guard` or `overlay`.
    pub program: &'static str,
    pub reason: &'static str,
    pub src: String,
    pub dst: String,
    pub len: u32,
    /// `CLOCK_MONOTONIC_COARSE` of the kernel, ns.
    pub ts_ns: u64,
    /// Wall-clock time of `ts_ns`, RFC 3339 (UTC, milliseconds).
    pub time: String,
}

impl EventRecord {
    #[must_use]
    pub fn from_event(e: &Event, meta: &AttachmentMeta) -> Self {
        let counter = Counter::from_slot(e.counter);
        Self {
            iface: meta.iface.clone(),
            netns: meta.netns.clone(),
            program: counter.map_or("unknown", Counter::program),
            reason: counter.map_or("unknown", Counter::reason),
            src: e.src().to_string(),
            dst: e.dst().to_string(),
            len: e.len,
            ts_ns: e.ts_ns,
            time: clock::rfc3339(clock::wall_ns_of_monotonic(e.ts_ns)),
        }
    }
}

impl std::fmt::Display for EventRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} [{}] {} {}: udp {} -> {} len {}",
            self.time, self.iface, self.netns, self.program, self.reason, self.src, self.dst, self.len
        )
    }
}

/// One pinned ring buffer, with the record of the attachment it belongs to.
pub struct EventRing {
    meta: AttachmentMeta,
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventRing {
    /// Opens the pinned ring buffers of `dir`; must run inside a tokio runtime.
    pub fn open_all(dir: &PinDir) -> Result<Vec<Self>> {
        let meta = dir.read_meta()?;
        let mut rings = Vec::new();
        for file in [pins::GUARD_EVENTS, pins::OVERLAY_EVENTS] {
            let path = dir.map(file);
            if !path.exists() {
                continue;
            }
            let data = MapData::from_pin(&path).with_context(|| format!("cannot open {}", path.display()))?;
            let ring = RingBuf::try_from(aya::maps::Map::RingBuf(data))?;
            // SAFETY: the RingBuf owns its fd for as long as the AsyncFd lives.
            let ring = unsafe { AsyncFd::register(ring) }?;
            rings.push(Self { meta: meta.clone(), ring });
        }
        Ok(rings)
    }

    /// Waits for, then drains, the next events.
    pub async fn next_batch(&mut self) -> Result<Vec<EventRecord>> {
        let mut guard = self.ring.readable_mut().await?;
        let mut out = Vec::new();
        while let Some(item) = guard.get_inner_mut().next() {
            if let Some(e) = Event::from_bytes(&item) {
                out.push(EventRecord::from_event(&e, &self.meta));
            }
        }
        guard.clear_ready();
        Ok(out)
    }
}

/// Reads every ring of `dirs` on its own task, forwarding batches to one channel.
pub fn spawn_readers(dirs: &[PinDir]) -> Result<tokio::sync::mpsc::Receiver<Result<Vec<EventRecord>>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    for dir in dirs {
        for mut ring in EventRing::open_all(dir)? {
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    let batch = ring.next_batch().await;
                    let stop = batch.is_err();
                    if tx.send(batch).await.is_err() || stop {
                        return;
                    }
                }
            });
        }
    }
    Ok(rx)
}

/// `natfix attach --log-events`: logs events of `dir` through tracing until dropped.
pub async fn log_events(dir: PinDir) -> Result<()> {
    let mut rx = spawn_readers(std::slice::from_ref(&dir))?;
    while let Some(batch) = rx.recv().await {
        for record in batch? {
            tracing::info!("event: {record}");
        }
    }
    std::future::pending().await
}
