//! How full a guard's own flow table is. It is an LRU table: past its size
//! the kernel evicts the flows used longest ago, and a reply to an evicted
//! flow is then dropped as unsolicited. The guard cannot tell such a reply
//! from an unsolicited packet, so the table's occupancy is what shows it.

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};

use crate::{
    abi::{FlowKey, FlowValue},
    pins::{self, PinDir},
};

/// Entries in the table against its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    pub entries: u64,
    pub size: u32,
}

impl Occupancy {
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
    Ok(Some(Occupancy { entries, size }))
}

#[cfg(test)]
mod tests {
    use super::Occupancy;

    #[test]
    fn nearly_full_from_nine_tenths() {
        assert!(!Occupancy { entries: 58_981, size: 65_536 }.nearly_full());
        assert!(Occupancy { entries: 58_983, size: 65_536 }.nearly_full());
        assert!(Occupancy { entries: 65_536, size: 65_536 }.nearly_full());
        assert!(!Occupancy { entries: 0, size: 64 }.nearly_full());
    }
}
