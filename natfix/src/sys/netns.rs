//! Network namespaces: resolve the user's `--netns` spelling to a file, and run
//! work inside a namespace on a dedicated OS thread. A resolved namespace
//! holds an open fd of it, so it stays reachable (and the same namespace)
//! after its name is removed or reused.

use std::{
    fs::File,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

use crate::error::UserError;

/// Where Docker keeps its sandboxes' namespaces (`ingress_sbox`, `1-<netid>`, ...).
pub const DOCKER_NETNS_DIR: &str = "/var/run/docker/netns";
/// Where `ip netns` keeps named namespaces.
pub const IP_NETNS_DIR: &str = "/run/netns";

/// A resolved namespace: the file that named it, its inode (identity), and
/// an open fd that keeps it reachable.
#[derive(Debug, Clone)]
pub struct Netns {
    /// What the user wrote, or `self` for natfix's own namespace.
    pub spec: String,
    pub path: PathBuf,
    pub inode: u64,
    fd: Arc<File>,
}

impl PartialEq for Netns {
    fn eq(&self, other: &Self) -> bool {
        self.inode == other.inode && self.spec == other.spec && self.path == other.path
    }
}

impl Eq for Netns {}

impl Netns {
    /// natfix's own namespace (the calling thread's).
    pub fn current() -> Result<Self> {
        Self::from_path("self".into(), PathBuf::from("/proc/thread-self/ns/net"))
    }

    fn from_path(spec: String, path: PathBuf) -> Result<Self> {
        let fd = open_ns(&path)?;
        let inode = fd.metadata().with_context(|| format!("cannot stat {}", path.display()))?.ino();
        Ok(Self { spec, path, inode, fd: Arc::new(fd) })
    }

    /// Resolves `--netns`, or the current namespace for `None`.
    pub fn resolve(spec: Option<&str>) -> Result<Self> {
        match spec {
            None => Self::current(),
            Some(s) => {
                let path = find_path(s, Path::new(DOCKER_NETNS_DIR), Path::new(IP_NETNS_DIR))?;
                check_is_netns(s, &path)?;
                Self::from_path(s.to_owned(), path)
            }
        }
    }
}

/// The first existing file `spec` names, or a `NotFound` error listing what was tried.
pub fn find_path(spec: &str, docker_dir: &Path, ip_dir: &Path) -> Result<PathBuf> {
    let candidates = candidates(spec, docker_dir, ip_dir)?;
    if let Some(found) = candidates.iter().find(|p| p.exists()) {
        return Ok(found.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(UserError::NotFound(format!(
        "network namespace `{spec}` not found (looked at: {}); list Docker's with `ls {}` and ip's with `ip netns list`",
        looked.join(", "),
        docker_dir.display()
    ))
    .into())
}

impl Netns {
    /// Runs `f` with this namespace as the network namespace of a fresh OS
    /// thread (never a tokio worker: setns is per thread).
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let target = Arc::clone(&self.fd);
        let name = self.spec.clone();
        std::thread::Builder::new()
            .name("natfix-netns".into())
            .spawn(move || -> Result<T> {
                let home = File::open("/proc/thread-self/ns/net").context("cannot open own namespace")?;
                setns(target.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    if e == nix::errno::Errno::EPERM {
                        anyhow::Error::from(UserError::Privilege(format!(
                            "entering namespace `{name}` needs CAP_SYS_ADMIN: run as root or in a privileged container"
                        )))
                    } else {
                        anyhow::anyhow!("setns into `{name}` failed: {e}")
                    }
                })?;
                let result = f();
                // The thread ends right after; coming back keeps any
                // thread-local state (e.g. cached sockets) consistent.
                setns(home.as_fd(), CloneFlags::CLONE_NEWNET).context("setns back failed")?;
                result
            })
            .context("cannot spawn namespace thread")?
            .join()
            .map_err(|_| anyhow::anyhow!("namespace worker panicked"))?
    }
}

/// The files `spec` may name, in the order they are tried.
fn candidates(spec: &str, docker_dir: &Path, ip_dir: &Path) -> Result<Vec<PathBuf>> {
    if spec.is_empty() {
        bail!(UserError::Usage("--netns must not be empty".into()));
    }
    if let Some(pid) = spec.strip_prefix("pid:") {
        let pid: u32 = pid
            .parse()
            .map_err(|_| UserError::Usage(format!("`{spec}`: pid:N needs a process id")))?;
        return Ok(vec![PathBuf::from(format!("/proc/{pid}/ns/net"))]);
    }
    if spec.starts_with('/') {
        return Ok(vec![PathBuf::from(spec)]);
    }
    if spec.contains('/') || spec == "." || spec == ".." {
        bail!(UserError::Usage(format!(
            "`{spec}` is neither a namespace name nor an absolute path"
        )));
    }
    let mut out = vec![docker_dir.join(spec), ip_dir.join(spec)];
    if spec == "ingress" {
        // Docker's ingress sandbox namespace.
        out.push(docker_dir.join("ingress_sbox"));
    }
    // A Docker network id (or its prefix) names the overlay namespace `1-<id[..10]>`.
    if spec.len() >= 10 && spec.bytes().all(|b| b.is_ascii_hexdigit()) {
        out.push(docker_dir.join(format!("1-{}", &spec[..10])));
    }
    Ok(out)
}

/// `ioctl(NS_GET_NSTYPE)`: from <linux/nsfs.h>, _IO(0xb7, 0x3).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Refuses files that are not network namespaces (a stale bind-mount target
/// is an empty regular file; a mount or pid namespace cannot be entered as net).
fn check_is_netns(spec: &str, path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let not_netns = || {
        UserError::NotFound(format!(
            "`{spec}` ({}) is not a network namespace (a namespace that no longer exists leaves an empty file behind)",
            path.display()
        ))
    };
    // Namespace files are regular files (nsfs); opening a FIFO or a device
    // could block or act on it.
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        bail!(not_netns());
    }
    let file = open_ns(path)?;
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
    let nstype = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    if nstype < 0 || nstype != libc::CLONE_NEWNET {
        bail!(not_netns());
    }
    Ok(())
}

/// Opens a namespace file without blocking (whatever a path turns out to be).
fn open_ns(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

impl Netns {
    /// The namespace with `inode`, by the first file that still names it:
    /// `hints` (a path recorded earlier; for natfix's own namespace that is
    /// /proc/thread-self, which names the reader's, hence the inode check),
    /// then `ip netns` and Docker names, then every process's namespace.
    pub fn find_by_inode(spec: &str, inode: u64, hints: &[PathBuf]) -> Result<Self> {
        let listed = |dir: &str| std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path());
        let candidates = hints
            .iter()
            .cloned()
            .chain(listed(IP_NETNS_DIR))
            .chain(listed(DOCKER_NETNS_DIR))
            .chain(listed("/proc").map(|p| p.join("ns/net")));
        for path in candidates {
            if std::fs::metadata(&path).is_ok_and(|m| m.ino() == inode)
                && let Ok(found) = Self::from_path(spec.to_owned(), path)
                && found.inode == inode
            {
                return Ok(found);
            }
        }
        bail!("no file names namespace `{spec}` (inode {inode}) any more (not in {IP_NETNS_DIR}, {DOCKER_NETNS_DIR} or any process)")
    }
}

/// `SO_NETNS_COOKIE` (Linux >= 5.14; libc 0.2.191 does not export it for this target).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Cookie of the calling thread's network namespace: unlike its inode, never
/// reused while the machine runs, so it tells a namespace from a later one
/// that got the same inode. None where the kernel has no cookies (< 5.14).
#[must_use]
pub fn current_cookie() -> Option<u64> {
    use std::os::fd::AsRawFd;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let sock = socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).ok()?;
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).ok()?;
    // SAFETY: the kernel writes at most `len` bytes into `cookie`; nix has no
    // SO_NETNS_COOKIE option.
    let rc = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &raw mut len)
    };
    (rc == 0 && len as usize == std::mem::size_of::<u64>()).then_some(cookie)
}

/// Inode of the calling thread's network namespace.
pub fn current_inode() -> Result<u64> {
    Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_namespace_by_inode_past_a_stale_hint() {
        let own = Netns::current().unwrap();
        let stale = PathBuf::from("/nonexistent/ns");
        let found = Netns::find_by_inode("self", own.inode, &[stale]).unwrap();
        assert_eq!(std::fs::metadata(&found.path).unwrap().ino(), own.inode);
        assert!(Netns::find_by_inode("gone", u64::MAX, &[]).is_err());
    }

    #[test]
    #[ignore = "needs root: cargo xtask test"]
    fn a_namespace_keeps_its_cookie_and_another_has_its_own() {
        let here = current_cookie().expect("kernel >= 5.14 has netns cookies");
        assert_eq!(current_cookie(), Some(here));
        let other = std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) needs CAP_SYS_ADMIN");
            current_cookie()
        })
        .join()
        .unwrap();
        assert!(other.is_some_and(|c| c != here), "a new namespace has a new cookie");
    }

    #[test]
    fn candidates_follow_documented_order() {
        let d = Path::new("/d");
        let i = Path::new("/i");
        assert_eq!(candidates("pid:42", d, i).unwrap(), vec![PathBuf::from("/proc/42/ns/net")]);
        assert_eq!(candidates("/x/y", d, i).unwrap(), vec![PathBuf::from("/x/y")]);
        assert_eq!(
            candidates("ingress", d, i).unwrap(),
            vec![PathBuf::from("/d/ingress"), PathBuf::from("/i/ingress"), PathBuf::from("/d/ingress_sbox")]
        );
        assert_eq!(
            candidates("de0d3f6935abcdef", d, i).unwrap().last().unwrap(),
            &PathBuf::from("/d/1-de0d3f6935")
        );
        assert!(candidates("pid:x", d, i).is_err());
        assert!(candidates("a/b", d, i).is_err());
        assert!(candidates("", d, i).is_err());
    }

    #[test]
    fn resolution_prefers_docker_then_ip_and_reports_what_it_tried() {
        let root = std::env::temp_dir().join(format!("natfix-netns-test-{}", std::process::id()));
        let docker = root.join("docker");
        let ip = root.join("ip");
        std::fs::create_dir_all(&docker).unwrap();
        std::fs::create_dir_all(&ip).unwrap();
        std::fs::write(ip.join("blue"), b"").unwrap();
        std::fs::write(docker.join("ingress_sbox"), b"").unwrap();
        std::fs::write(docker.join("1-de0d3f6935"), b"").unwrap();

        assert_eq!(find_path("blue", &docker, &ip).unwrap(), ip.join("blue"));
        assert_eq!(find_path("ingress", &docker, &ip).unwrap(), docker.join("ingress_sbox"));
        assert_eq!(find_path("de0d3f6935aa11", &docker, &ip).unwrap(), docker.join("1-de0d3f6935"));
        // A regular file is found but is no namespace.
        let err = check_is_netns("blue", &ip.join("blue")).unwrap_err();
        assert!(format!("{err}").contains("not a network namespace"));
        check_is_netns("self", Path::new("/proc/self/ns/net")).unwrap();
        let err = find_path("nope", &docker, &ip).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("not found") && msg.contains(&docker.join("nope").display().to_string()), "{msg}");
        assert!(matches!(err.downcast_ref::<UserError>(), Some(UserError::NotFound(_))));
        std::fs::remove_dir_all(root).unwrap();
    }
}
