//! Where an attachment lives in bpffs, and how it gets there atomically.
//!
//! Layout: `/sys/fs/bpf/natfix/<netns-inode>/<iface>/` holds the maps
//! (`counters`, `flows`, ...), the links when `--pin` was used
//! (`link_<program>`), and `meta`: a one-slot array map whose value is the
//! attachment's JSON record. Keeping the record in bpffs (not /run) lets a
//! privileged container and the host see the same attachments through one
//! bind mount.
//!
//! bpffs refuses names with a dot, so an interface name's `.` (VLAN devices
//! such as `eth0.100`) is written `%2E` (and `%` as `%25`).
//!
//! Concurrency and crashes: every change to attachments holds [`ChangeLock`]
//! (flock on natfix's root directory, released by the kernel when the
//! process dies). An attachment is built in a staging
//! directory (`staging:<pid>:<iface>`; `:` is in no interface name) whose record is kept up to date as
//! a journal of what was done, then renamed into place (`RENAME_NOREPLACE`):
//! it appears whole or not at all. Staging left by a dead process is undone
//! by the next attach or detach in that namespace.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, MapData};
use nix::sys::statfs::BPF_FS_MAGIC;

use crate::{
    config::IfaceName,
    error::UserError,
    record::{AttachmentMeta, Program},
};

pub const BPFFS: &str = "/sys/fs/bpf";
/// Pin names of the maps in an attachment's directory.
pub const GUARD_COUNTERS: &str = "counters";
pub const GUARD_FLOWS: &str = "flows";
pub const GUARD_FLOW_PORTS: &str = "flow_ports";
pub const OVERLAY_COUNTERS: &str = "overlay_counters";
pub const GUARD_EVENTS: &str = "events";
pub const OVERLAY_EVENTS: &str = "overlay_events";
pub const OVERLAY_WRITER: &str = "overlay_writer";
/// Pin names of the maps `natfix set` rewrites (`loader::settings`).
pub const GUARD_PORTS: &str = "ports";
pub const GUARD_SETTINGS: &str = "settings";
pub const GUARD_ALLOW_SRC4: &str = "allow_src4";
pub const GUARD_ALLOW_SRC6: &str = "allow_src6";
pub const GUARD_EVENT_RATE: &str = "event_rate";
pub const OVERLAY_SETTINGS: &str = "overlay_settings";
pub const OVERLAY_EVENT_RATE: &str = "overlay_event_rate";
const META_SIZE: usize = 4096;
const STAGING_PREFIX: &str = "staging:";
/// How long a command waits for another natfix working in the same namespace.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// natfix's root in bpffs.
#[must_use]
pub fn root() -> PathBuf {
    Path::new(BPFFS).join("natfix")
}

/// Fails with a clear message when bpffs is not mounted at /sys/fs/bpf, or
/// natfix's part of it cannot be read (exit 4: privileges).
pub fn require_bpffs() -> Result<()> {
    let stat = nix::sys::statfs::statfs(BPFFS);
    match stat {
        Ok(s) if s.filesystem_type() == BPF_FS_MAGIC => {}
        Err(nix::errno::Errno::EACCES | nix::errno::Errno::EPERM) => bail!(privilege(BPFFS)),
        _ => bail!(UserError::Unsupported(missing_bpffs_advice())),
    }
    match std::fs::read_dir(root()) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(privilege(&root().display().to_string())),
        _ => Ok(()),
    }
}

/// A foreground attach run by `ip netns exec` (a private mount namespace
/// whose /sys has no bpffs) mounts its own bpffs there, as bpftool does:
/// nothing outside sees it, and it goes with the process, which is what a
/// foreground attachment does anyway. Anywhere else (a container started
/// without the bpffs mount, say) a missing bpffs is the operator's to fix:
/// as `require_bpffs`.
pub fn require_bpffs_or_mount_private() -> Result<()> {
    let missing = nix::sys::statfs::statfs(BPFFS).is_ok_and(|s| s.filesystem_type() != BPF_FS_MAGIC);
    let private = std::fs::read_link("/proc/self/ns/mnt").ok() != std::fs::read_link("/proc/1/ns/mnt").ok();
    if missing && private && let Some(ns) = ip_netns_name() {
        use nix::mount::{MsFlags, mount};
        mount(Some("bpf"), BPFFS, Some("bpf"), MsFlags::empty(), None::<&str>)
            .map_err(|e| anyhow::anyhow!("{}; mounting a private one failed: {e}", missing_bpffs_advice()))?;
        tracing::warn!(
            "mounted a private bpffs at {BPFFS} (`ip netns exec` left none): `natfix status` from the host will not list this attachment; `natfix attach --netns {ns}` from the host is the usual way"
        );
    }
    require_bpffs()
}

/// The name under /run/netns of the calling thread's namespace, if any: a
/// command run by `ip netns exec NAME`.
fn ip_netns_name() -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let here = crate::sys::netns::current_inode().ok()?;
    std::fs::read_dir(crate::sys::netns::IP_NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .find(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.ino() == here))
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

/// Why there is no bpffs, and what to do. `ip netns exec` remounts /sys
/// (without bpffs) for the command it runs: the usual cause inside one.
fn missing_bpffs_advice() -> String {
    match ip_netns_name() {
        Some(ns) => format!(
            "no bpffs mounted at {BPFFS}: `ip netns exec` remounts /sys without it; run `natfix ... --netns {ns}` from the host instead"
        ),
        None => format!("no bpffs mounted at {BPFFS}: run `mount -t bpf bpf {BPFFS}` (in a container: -v {BPFFS}:{BPFFS})"),
    }
}

fn privilege(what: &str) -> UserError {
    UserError::Privilege(format!(
        "cannot read {what}: natfix's records and maps need CAP_BPF and CAP_SYS_ADMIN (run as root, or in a container with those capabilities)"
    ))
}

/// The directory of one namespace's attachments.
#[must_use]
pub fn netns_dir(netns_inode: u64) -> PathBuf {
    root().join(netns_inode.to_string())
}

/// Exclusive right to change natfix's attachments on this host (all
/// namespaces: changes are rare and short, and one lock on natfix's root,
/// which is never removed, cannot be split by a directory coming and going).
#[derive(Debug)]
pub struct ChangeLock {
    _root: File,
}

impl ChangeLock {
    /// Waits (up to 30 s) for the lock.
    pub fn acquire() -> Result<Self> {
        let path = root();
        std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let dir = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let end = Instant::now() + LOCK_WAIT;
        loop {
            // SAFETY: flock on an fd we own; no memory is involved.
            if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Self { _root: dir });
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err).with_context(|| format!("cannot lock {}", path.display()));
            }
            if Instant::now() > end {
                bail!(UserError::Conflict(format!(
                    "another natfix has been changing attachments for {}s ({} is locked)",
                    LOCK_WAIT.as_secs(),
                    path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes namespace `netns_inode`'s directory if nothing is left in it.
pub fn prune_netns_dir(netns_inode: u64) {
    let _ = std::fs::remove_dir(netns_dir(netns_inode)); // only succeeds when empty
}

/// The bpffs directory of one attachment (or of one being built).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    /// Where the attachment on `iface` in namespace `netns_inode` lives.
    #[must_use]
    pub fn new(netns_inode: u64, iface: &IfaceName) -> Self {
        Self { path: netns_dir(netns_inode).join(encode_name(iface.as_str())) }
    }

    /// Where this process builds the attachment on `iface` before publishing it.
    #[must_use]
    pub fn staging(netns_inode: u64, iface: &IfaceName) -> Self {
        Self { path: netns_dir(netns_inode).join(format!("{STAGING_PREFIX}{}:{}", std::process::id(), encode_name(iface.as_str()))) }
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
        // create_dir_all: the namespace's directory may be new too.
        std::fs::create_dir_all(&self.path).with_context(|| format!("cannot create {}", self.path.display()))
    }

    /// Moves this (staging) directory to `to`, failing with a conflict if
    /// something is there already: the attachment appears whole or not at all.
    pub fn publish(&self, to: &Self) -> Result<()> {
        use std::ffi::CString;
        let c = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).context("path with a NUL byte");
        let (from, dest) = (c(&self.path)?, c(&to.path)?);
        // SAFETY: two valid C strings; renameat2 only reads them.
        let rc = unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, dest.as_ptr(), libc::RENAME_NOREPLACE) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EEXIST) {
            bail!(UserError::Conflict(format!("{} appeared while natfix was attaching", to.path.display())));
        }
        Err(err).with_context(|| format!("cannot move {} to {}", self.path.display(), to.path.display()))
    }

    /// Removes every pin in the directory, the directory, and the namespace
    /// directory above it when it is left empty. Removing a link's pin
    /// detaches it once no process holds it.
    pub fn remove(&self) -> Result<()> {
        if let Ok(entries) = std::fs::read_dir(&self.path) {
            for entry in entries.flatten() {
                std::fs::remove_file(entry.path()).with_context(|| format!("cannot remove {}", entry.path().display()))?;
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

    /// Writes the record: a fresh pinned `meta` map, renamed over the old
    /// one, so that readers see the old record or the new, never none.
    pub fn write_meta(&self, meta: &AttachmentMeta) -> Result<()> {
        let json = serde_json::to_vec(meta)?;
        if json.len() >= META_SIZE {
            bail!("attachment record is {} bytes; the meta map holds {META_SIZE}", json.len());
        }
        let mut value = [0u8; META_SIZE];
        value[..json.len()].copy_from_slice(&json);
        let data = MapData::create(meta_map_def(), "natfix_meta", None).context("cannot create the meta map")?;
        let fresh = self.path.join("meta_new");
        let _ = std::fs::remove_file(&fresh);
        data.pin(&fresh).with_context(|| format!("cannot pin {}", fresh.display()))?;
        let mut array: Array<MapData, [u8; META_SIZE]> = Array::try_from(aya::maps::Map::Array(data))?;
        array.set(0, value, 0).context("cannot write the attachment record")?;
        std::fs::rename(&fresh, self.meta_path()).with_context(|| format!("cannot replace {}", self.meta_path().display()))
    }

    pub fn read_meta(&self) -> Result<AttachmentMeta> {
        let path = self.meta_path();
        let data = MapData::from_pin(&path).map_err(|e| match &e {
            aya::maps::MapError::SyscallError(s) if matches!(s.io_error.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
                anyhow::Error::from(privilege(&path.display().to_string()))
            }
            _ => anyhow::Error::from(e).context(format!("cannot open {}", path.display())),
        })?;
        let array: Array<MapData, [u8; META_SIZE]> = Array::try_from(aya::maps::Map::Array(data))?;
        let value = array.get(&0, 0)?;
        let len = value.iter().position(|b| *b == 0).unwrap_or(META_SIZE);
        serde_json::from_slice(&value[..len]).with_context(|| format!("corrupt record in {}", path.display()))
    }

    /// The namespace inode of this directory, from its path.
    #[must_use]
    pub fn netns_inode(&self) -> Option<u64> {
        self.path.parent()?.file_name()?.to_str()?.parse().ok()
    }

    /// The interface name in the path (what the record was filed under).
    #[must_use]
    pub fn iface_name(&self) -> Option<String> {
        let name = self.path.file_name()?.to_str()?;
        Some(decode_name(staging_owner(name).map_or(name, |(_, iface)| iface)))
    }
}

fn meta_map_def() -> aya_obj::Map {
    aya_obj::Map::Legacy(aya_obj::maps::LegacyMap {
        def: aya_obj::maps::bpf_map_def {
            map_type: aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
            key_size: 4,
            value_size: u32::try_from(META_SIZE).expect("META_SIZE fits u32"),
            max_entries: 1,
            ..Default::default()
        },
        inner_def: None,
        section_index: 0,
        section_kind: aya_obj::EbpfSectionKind::Maps,
        symbol_index: None,
        data: Vec::new(),
    })
}

/// `staging:<pid>:<iface>` -> (pid, encoded iface).
fn staging_owner(name: &str) -> Option<(u32, &str)> {
    let rest = name.strip_prefix(STAGING_PREFIX)?;
    let (pid, iface) = rest.split_once(':')?;
    Some((pid.parse().ok()?, iface))
}

/// An interface name as a bpffs path component: no `.`.
fn encode_name(name: &str) -> String {
    name.replace('%', "%25").replace('.', "%2E")
}

fn decode_name(name: &str) -> String {
    name.replace("%2E", ".").replace("%25", "%")
}

/// What natfix finds in bpffs.
#[derive(Debug)]
#[expect(clippy::large_enum_variant, reason = "a few entries per listing, moved out by value; a box would only add noise")]
pub enum Entry {
    /// A published attachment and its record.
    Attachment(PinDir, AttachmentMeta),
    /// A published directory whose record cannot be read.
    Corrupt(PinDir, String),
    /// An attachment being built by process `pid` (or left by it when it died).
    Staging(PinDir, u32),
}

/// Every entry under natfix's root, sorted by path. Unreadable: a privilege error.
pub fn entries() -> Result<Vec<Entry>> {
    require_bpffs()?;
    let mut dirs: Vec<PathBuf> = Vec::new();
    for ns in std::fs::read_dir(root()).into_iter().flatten().flatten() {
        if ns.path().is_dir() {
            dirs.extend(std::fs::read_dir(ns.path()).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    dirs.sort();
    let mut out = Vec::new();
    for path in dirs {
        let dir = PinDir { path };
        let name = dir.path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if let Some((pid, _)) = staging_owner(&name) {
            out.push(Entry::Staging(dir, pid));
            continue;
        }
        match dir.read_meta() {
            Ok(meta) => out.push(Entry::Attachment(dir, meta)),
            Err(e) if crate::error::exit_code(&e) == 4 => return Err(e),
            Err(e) => out.push(Entry::Corrupt(dir, format!("{e:#}"))),
        }
    }
    Ok(out)
}

/// The published attachments with readable records.
pub fn attachments() -> Result<Vec<(PinDir, AttachmentMeta)>> {
    Ok(entries()?
        .into_iter()
        .filter_map(|e| match e {
            Entry::Attachment(dir, meta) => Some((dir, meta)),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_carry_the_owner() {
        assert_eq!(staging_owner("staging:4242:eth0"), Some((4242, "eth0")));
        assert_eq!(staging_owner("eth0"), None);
        assert_eq!(staging_owner("staging:x:eth0"), None);
        let iface: IfaceName = "eth0.100".parse().unwrap();
        let dir = PinDir::staging(4_026_531_840, &iface);
        assert!(!dir.path.display().to_string().contains('.'), "bpffs refuses dots: {}", dir.path.display());
        assert_eq!((dir.netns_inode(), dir.iface_name().as_deref()), (Some(4_026_531_840), Some("eth0.100")));
        let published = PinDir::new(7, &"a%b.c".parse().unwrap());
        assert_eq!(published.path.file_name().unwrap(), "a%25b%2Ec");
        assert_eq!(published.iface_name().as_deref(), Some("a%b.c"));
    }
}
