//! Where an attachment lives in bpffs, and the record it leaves there.
//!
//! Layout: `/sys/fs/bpf/natfix/<netns-inode>/<iface>/` holds the maps
//! (`counters`, `flows`), the links when `--pin` was used (`link_<program>`),
//! and `meta`: a one-slot array map whose value is the attachment's JSON
//! record. Keeping the record in bpffs (not /run) lets a privileged container
//! and the host see the same attachments through one bind mount.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, MapData};

use crate::{config::IfaceName, error::UserError, record::{AttachmentMeta, Program}};

pub const BPFFS: &str = "/sys/fs/bpf";
/// Pin names of the maps in an attachment's directory.
pub const GUARD_COUNTERS: &str = "counters";
pub const GUARD_FLOWS: &str = "flows";
pub const GUARD_FLOW_PORTS: &str = "flow_ports";
pub const OVERLAY_COUNTERS: &str = "overlay_counters";
pub const GUARD_EVENTS: &str = "events";
pub const OVERLAY_EVENTS: &str = "overlay_events";
pub const OVERLAY_WRITER: &str = "overlay_writer";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const META_SIZE: usize = 4096;

/// Fails with a clear message when bpffs is not mounted at /sys/fs/bpf.
pub fn require_bpffs() -> Result<()> {
    let stat = nix::sys::statfs::statfs(BPFFS);
    match stat {
        Ok(s) if i64::from(s.filesystem_type().0) == BPF_FS_MAGIC => Ok(()),
        _ => bail!(UserError::Unsupported(format!(
            "no bpffs mounted at {BPFFS}: run `mount -t bpf bpf {BPFFS}` (in a container: -v {BPFFS}:{BPFFS})"
        ))),
    }
}

/// The bpffs directory of one (namespace, interface).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    #[must_use]
    pub fn new(netns_inode: u64, iface: &IfaceName) -> Self {
        Self {
            path: Path::new(BPFFS).join("natfix").join(netns_inode.to_string()).join(iface.as_str()),
        }
    }

    #[must_use]
    pub fn map(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    #[must_use]
    pub fn link(&self, program: Program) -> PathBuf {
        self.path.join(format!("link_{}", program.c_name()))
    }

    #[must_use]
    pub fn meta_path(&self) -> PathBuf {
        self.path.join("meta")
    }

    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.path).with_context(|| format!("cannot create {}", self.path.display()))
    }

    /// Removes every pin in the directory, the directory, and the namespace
    /// directory above it when it is left empty. Removing a link's pin
    /// detaches it once no process holds it.
    pub fn remove(&self) -> Result<()> {
        if let Ok(entries) = std::fs::read_dir(&self.path) {
            for entry in entries.flatten() {
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("cannot remove {}", entry.path().display()))?;
            }
        }
        match std::fs::remove_dir(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", self.path.display())),
        }
        if let Some(parent) = self.path.parent() {
            let _ = std::fs::remove_dir(parent); // only succeeds when empty
        }
        Ok(())
    }

    /// Writes the record into a fresh pinned `meta` map.
    pub fn write_meta(&self, meta: &AttachmentMeta) -> Result<()> {
        let json = serde_json::to_vec(meta)?;
        if json.len() >= META_SIZE {
            bail!("attachment record is {} bytes; the meta map holds {META_SIZE}", json.len());
        }
        let mut value = [0u8; META_SIZE];
        value[..json.len()].copy_from_slice(&json);
        let obj = aya_obj::Map::Legacy(aya_obj::maps::LegacyMap {
            def: aya_obj::maps::bpf_map_def {
                map_type: aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
                key_size: 4,
                value_size: META_SIZE as u32,
                max_entries: 1,
                ..Default::default()
            },
            inner_def: None,
            section_index: 0,
            section_kind: aya_obj::EbpfSectionKind::Maps,
            symbol_index: None,
            data: Vec::new(),
        });
        let data = MapData::create(obj, "natfix_meta", None).context("cannot create the meta map")?;
        let path = self.meta_path();
        let _ = std::fs::remove_file(&path);
        data.pin(&path).with_context(|| format!("cannot pin {}", path.display()))?;
        let mut array: Array<MapData, [u8; META_SIZE]> = Array::try_from(aya::maps::Map::Array(data))?;
        array.set(0, value, 0).context("cannot write the attachment record")?;
        Ok(())
    }

    pub fn read_meta(&self) -> Result<AttachmentMeta> {
        let path = self.meta_path();
        let data = MapData::from_pin(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let array: Array<MapData, [u8; META_SIZE]> = Array::try_from(aya::maps::Map::Array(data))?;
        let value = array.get(&0, 0)?;
        let len = value.iter().position(|b| *b == 0).unwrap_or(META_SIZE);
        serde_json::from_slice(&value[..len]).with_context(|| format!("corrupt record in {}", path.display()))
    }

    /// Every natfix pin directory that has a record.
    pub fn list_all() -> Vec<Self> {
        let mut out = Vec::new();
        let root = Path::new(BPFFS).join("natfix");
        for ns in std::fs::read_dir(root).into_iter().flatten().flatten() {
            for iface in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                let dir = Self { path: iface.path() };
                if dir.meta_path().exists() {
                    out.push(dir);
                }
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }
}

