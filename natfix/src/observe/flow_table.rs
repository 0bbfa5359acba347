//! How full a guard's own flow table is. It is an LRU table: past its size
//! the kernel evicts the flows used longest ago, and a reply to an evicted
//! flow is then dropped as unsolicited. The guard cannot tell such a reply
//! from an unsolicited packet, so the table's occupancy is what shows it,
//! with a lower bound on the flows evicted since attach: nothing but LRU
//! removes entries from the table, so every flow the learner created that is
//! no longer there was evicted (conntrack-seeded flows, which the learner
//! does not count, only make the true number larger).

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};

use crate::{
    abi::{Counter, FlowKey, FlowValue},
    pins::{self, PinDir},
};

/// Entries in the table against its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    pub entries: u64,
    pub size: u32,
    /// Flows the egress learner created since attach (`learned`), if it counts.
    pub learned: Option<u64>,
}

impl Occupancy {
    /// At least this many flows were evicted since attach. (The learner's
    /// count can exceed the keys it made by the rare race of two CPUs
    /// learning one flow at once: a handful, never a steady climb.)
    #[must_use]
    pub fn evicted_at_least(&self) -> u64 {
        self.learned.map_or(0, |l| l.saturating_sub(self.entries))
    }

    /// At or past nine tenths of its size: LRU eviction of live flows is near
    /// or under way (the kernel's LRU evicts before the table is exactly full).
    #[must_use]
    pub const fn nearly_full(&self) -> bool {
        self.entries * 10 >= self.size as u64 * 9
    }
}

/// The own flow table's occupancy of the attachment in `dir`; `None` when it
/// has none (no guard, or the conntrack flow source).
///
/// Walks the keys (one syscall each: about a second per million entries).
///
/// # Errors
///
/// When the pinned table cannot be opened.
pub fn read(dir: &PinDir) -> Result<Option<Occupancy>> {
    let path = dir.map(pins::GUARD_FLOWS);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = data.info().with_context(|| format!("cannot read {}'s info", path.display()))?.max_entries();
    let flows: BpfHashMap<MapData, FlowKey, FlowValue> = BpfHashMap::try_from(Map::LruHashMap(data))?;
    // A key deleted while the walk passes it ends the walk early: a lower
    // bound, which is what a warning threshold can use.
    let entries = flows.keys().map_while(Result::ok).count() as u64;
    Ok(Some(Occupancy { entries, size, learned: learned(dir) }))
}

/// The learner's `learned` counter summed over CPUs; `None` without one.
fn learned(dir: &PinDir) -> Option<u64> {
    let counters = super::stats::open_counters(dir, pins::GUARD_COUNTERS).ok()?;
    let per_cpu = counters.get(&(Counter::FlowLearned as u32), 0).ok()?;
    Some(per_cpu.iter().map(|v| v.packets).sum())
}

#[cfg(test)]
mod tests {
    use super::Occupancy;

    #[test]
    fn nearly_full_from_nine_tenths() {
        let o = |entries, size| Occupancy { entries, size, learned: None };
        assert!(!o(58_981, 65_536).nearly_full());
        assert!(o(58_983, 65_536).nearly_full());
        assert!(o(65_536, 65_536).nearly_full());
        assert!(!o(0, 64).nearly_full());
    }

    #[test]
    fn evicted_is_what_the_learner_made_and_the_table_lost() {
        assert_eq!(Occupancy { entries: 65_536, size: 65_536, learned: Some(81_920) }.evicted_at_least(), 16_384);
        // Conntrack-seeded entries: more keys than the learner made.
        assert_eq!(Occupancy { entries: 900, size: 65_536, learned: Some(100) }.evicted_at_least(), 0);
        assert_eq!(Occupancy { entries: 10, size: 64, learned: None }.evicted_at_least(), 0);
    }
}
