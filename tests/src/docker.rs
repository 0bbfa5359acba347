//! A real Docker engine for the tests that are about Docker's behaviour (its
//! NAT rules, namespaces, published ports): whether one answers, a tiny
//! local image to run containers from, containers removed on drop, and a
//! swarm left on drop.

use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result, bail};

use crate::sh;

/// The image the tests' containers run: busybox, imported from the host's
/// static binary (no registry is reachable here).
pub const BUSYBOX: &str = "natfix-test-busybox:latest";

/// `docker ARGS`, its stdout.
///
/// # Errors
///
/// When docker fails (its stderr is in the message).
pub fn docker(args: &[&str]) -> Result<String> {
    let mut cmd = vec!["docker"];
    cmd.extend_from_slice(args);
    sh(&cmd)
}

/// Why the Docker tests cannot run here, if they cannot.
#[must_use]
pub fn unavailable() -> Option<String> {
    if docker(&["version", "--format", "{{.Server.Version}}"]).is_err() {
        let why = std::env::var("NATFIX_DOCKER_UNAVAILABLE").unwrap_or_else(|_| "cargo xtask test starts one".into());
        return Some(format!("dockerd is not answering on /var/run/docker.sock ({why})"));
    }
    None
}

/// natfix's image, built by `cargo xtask image`.
pub const NATFIX_IMAGE: &str = "natfix:latest";

/// Why the tests of natfix's image cannot run here: no engine, or no image.
#[must_use]
pub fn image_unavailable() -> Option<String> {
    if let Some(why) = unavailable() {
        return Some(why);
    }
    if docker(&["image", "inspect", NATFIX_IMAGE]).is_err() {
        let why = std::env::var("NATFIX_DOCKER_UNAVAILABLE").unwrap_or_else(|_| "build it with `cargo xtask image`".into());
        return Some(format!("image {NATFIX_IMAGE} is missing ({why})"));
    }
    None
}

/// Tests of one binary that change Docker's global state (swarm, containers
/// publishing ports) take turns.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Imports [`BUSYBOX`] unless it exists: `/bin/busybox` (Debian's
/// busybox-static) and the applet links the tests use.
///
/// # Errors
///
/// When busybox-static is not installed or the import fails.
pub fn ensure_busybox() -> Result<&'static str> {
    if docker(&["image", "inspect", BUSYBOX]).is_ok() {
        return Ok(BUSYBOX);
    }
    let busybox = std::path::Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox is missing (apt-get install busybox-static; cargo xtask deps does)");
    }
    let root = std::env::temp_dir().join(format!("natfix-busybox-{}", std::process::id()));
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::copy(busybox, root.join("bin/busybox"))?;
    for applet in ["sh", "sleep", "nc", "ip"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    let out = sh(&["sh", "-c", &format!("tar -C {} -c . | docker import - {BUSYBOX}", root.display())]);
    let _ = std::fs::remove_dir_all(&root);
    out.context("docker import")?;
    Ok(BUSYBOX)
}

/// A container, removed (with its volumes) on drop.
pub struct Container {
    pub id: String,
}

impl Container {
    /// `docker run -d ARGS`.
    ///
    /// # Errors
    ///
    /// When docker refuses.
    pub fn run(args: &[&str]) -> Result<Self> {
        let mut all = vec!["run", "-d"];
        all.extend_from_slice(args);
        let id = docker(&all)?.trim().to_owned();
        Ok(Self { id })
    }

    /// Its init process (to enter its namespaces).
    ///
    /// # Errors
    ///
    /// When docker cannot say.
    pub fn pid(&self) -> Result<u32> {
        Ok(docker(&["inspect", "-f", "{{.State.Pid}}", &self.id])?.trim().parse()?)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.id]);
    }
}

/// Docker refuses rslave binds whose source is on a private mount. systemd
/// makes / shared at boot; a host without it (this test machine) gets what
/// systemd would have done. Left in place, like a mounted bpffs.
///
/// # Panics
///
/// When mountinfo cannot be read or the remount fails.
pub fn ensure_shared_root() {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = mountinfo.lines().find(|l| l.split_whitespace().nth(4) == Some("/")).expect("/ in mountinfo");
    let optional: Vec<&str> = root.split(" - ").next().unwrap().split_whitespace().skip(6).collect();
    if !optional.iter().any(|f| f.starts_with("shared:") || f.starts_with("master:")) {
        eprintln!("making / a shared mount (as systemd does at boot): Docker's rslave binds need it");
        sh(&["mount", "--make-rshared", "/"]).unwrap();
    }
}

/// A single-node swarm made by the test, left on drop (a failed test must
/// not leave one), with a service publishing 25700/udp (the routing mesh's
/// `ingress_sbox` exists once a service publishes a port).
pub struct Swarm {
    service: String,
}

impl Swarm {
    /// Why a test cannot make its own swarm here, if it cannot.
    #[must_use]
    pub fn unavailable() -> Option<String> {
        match docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]) {
            Ok(state) if state.trim() == "inactive" => None,
            Ok(_) => Some("this engine is already part of a swarm: the test would have to leave it".into()),
            Err(e) => Some(format!("docker info: {e:#}")),
        }
    }

    /// `docker swarm init`, then the publishing service from `image`.
    ///
    /// # Panics
    ///
    /// When Docker refuses either.
    #[must_use]
    pub fn init(image: &str, service: &str) -> Self {
        docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]).unwrap();
        let swarm = Self { service: service.to_owned() };
        docker(&[
            "service", "create", "--detach", "--name", service, "--publish", "published=25700,target=25700,protocol=udp", image, "sleep", "3000",
        ])
        .unwrap();
        swarm
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        let _ = docker(&["service", "rm", &self.service]);
        let _ = docker(&["swarm", "leave", "--force"]);
    }
}
