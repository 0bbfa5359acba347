//! Where an attachment lives in bpffs, and the record it leaves there.
//!
//! Layout: `/sys/fs/bpf/natfix/<netns-inode>/<iface>/` holds the maps
//! (`counters`, `flows`), the links when `--pin` was used (`link_<program>`),
//! and `meta`: a one-slot array map whose value is the attachment's JSON
//! record. Keeping the record in bpffs (not /run) lets a privileged container
//! and the host see the same attachments through one bind mount.

use std::{
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, MapData};
use serde::{Deserialize, Serialize};

use crate::error::UserError;

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
    pub fn new(netns_inode: u64, iface: &str) -> Self {
        Self {
            path: Path::new(BPFFS).join("natfix").join(netns_inode.to_string()).join(iface),
        }
    }

    #[must_use]
    pub fn map(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    #[must_use]
    pub fn link(&self, program: &str) -> PathBuf {
        self.path.join(format!("link_{program}"))
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

/// What `natfix status` shows, and what `detach` needs to undo an attachment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachmentMeta {
    pub natfix_version: String,
    /// The namespace as the user named it (`self` when none was given).
    pub netns: String,
    pub netns_path: String,
    pub netns_inode: u64,
    /// The namespace's cookie (`netns::current_cookie`); None from older
    /// records or kernels < 5.14. Pins are keyed by inode, which a later
    /// namespace can reuse: the cookie tells them apart.
    #[serde(default)]
    pub netns_cookie: Option<u64>,
    pub iface: String,
    pub ifindex: u32,
    /// The foreground `natfix attach` that owns it; None when pinned.
    pub pid: Option<u32>,
    pub pinned: bool,
    pub created_unix: u64,
    pub programs: Vec<ProgramMeta>,
    pub guard: Option<GuardMeta>,
    pub overlay: Option<OverlayMeta>,
    /// natfix added the clsact qdisc (kernels without tcx) and must remove it.
    pub created_clsact: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProgramMeta {
    pub name: String,
    /// `xdp`, `tc-ingress` or `tc-egress`.
    pub hook: String,
    /// `native`/`generic` for XDP, `tcx`/`clsact` for tc.
    pub mode: String,
    pub prog_id: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuardMeta {
    pub ranges: Vec<String>,
    pub flow_source: String,
    pub flow_source_reason: String,
    pub filtering: String,
    pub dry_run: bool,
    pub allow_ports: Vec<u16>,
    pub allow_src: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OverlayMeta {
    pub vxlan_ports: Vec<u16>,
    pub csum: String,
    pub backend: String,
    pub reqid: Option<u32>,
    /// What natfix changed on the host, undone on detach.
    pub changes: crate::overlay::OverlayChanges,
}

impl AttachmentMeta {
    /// Whether the record was written in the namespace whose cookie is
    /// `current` (the caller's). Only two known, different cookies say no:
    /// the recorded namespace is gone and its inode went to this one.
    #[must_use]
    pub fn written_in(&self, current: Option<u64>) -> bool {
        !matches!((self.netns_cookie, current), (Some(a), Some(b)) if a != b)
    }

    /// The namespace this record was written in, entered through any file
    /// that still names it: the recorded path, the owner's, then any other
    /// (`Netns::find_by_inode`). Fails when it is gone, even if a later
    /// namespace got its inode.
    pub fn find_netns(&self) -> Result<crate::netns::Netns> {
        let hints: Vec<PathBuf> =
            std::iter::once(self.netns_path.clone().into()).chain(self.pid.map(|pid| format!("/proc/{pid}/ns/net").into())).collect();
        let ns = crate::netns::Netns::find_by_inode(&self.netns, self.netns_inode, &hints)?;
        if self.netns_cookie.is_some() && !self.written_in(ns.run(|| Ok(crate::netns::current_cookie()))?) {
            bail!("namespace `{}` is gone: inode {} now names another", self.netns, self.netns_inode);
        }
        Ok(ns)
    }

    /// Still owned by someone: pinned, or its foreground process is alive.
    #[must_use]
    pub fn is_live(&self) -> bool {
        self.pinned || self.pid.is_some_and(process_alive)
    }
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    // Signal 0 checks existence; EPERM still means it exists.
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

#[must_use]
pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
