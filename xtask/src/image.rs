//! `cargo xtask image`: the runtime image `natfix:latest` from
//! deploy/Dockerfile and a release build of natfix.
//!
//! The Dockerfile's base (`FROM debian:bookworm-slim`) is used as the engine
//! has it, else pulled; where no registry answers, it is built here: a Debian
//! minbase root filesystem from mmdebstrap, with the runtime tools already
//! in it (so the Dockerfile's install step has nothing to fetch), imported
//! under the base's name. The root filesystem is cached in vm-cache/image/,
//! which `cargo clean` keeps, so reruns take seconds.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{docker, run::{cargo, workspace}};

/// The image `cargo xtask image` builds and the Docker tests run.
pub const IMAGE: &str = "natfix:latest";

/// What natfix runs at run time (nft; ip and tc; modprobe and modinfo;
/// iptables-save), baked into a locally built base. The Dockerfile installs
/// the same when its base lacks them.
const RUNTIME_PACKAGES: &[&str] = &["nftables", "iproute2", "kmod", "iptables"];

/// How long `docker pull` may take to say whether a registry answers.
const PULL_TIMEOUT: Duration = Duration::from_mins(2);

pub fn build() -> Result<()> {
    let engine = docker::require_engine()?;
    cargo(&["build", "--release", "-p", "natfix"])?;
    let binary = workspace().join("target/release/natfix");
    let (version, commit) = binary_version(&binary)?;
    println!("xtask image: {} is natfix {version} ({commit})", binary.display());

    let context = workspace().join("target/image-context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context).with_context(|| format!("cannot create {}", context.display()))?;
    std::fs::copy(&binary, context.join("natfix")).with_context(|| format!("cannot copy natfix into {}", context.display()))?;

    let dockerfile = workspace().join("deploy/Dockerfile");
    let base = dockerfile_base(&dockerfile)?;
    ensure_base(&base)?;

    let mut build = Command::new("docker");
    build
        .args(["build", "-t", IMAGE, "-f"])
        .arg(&dockerfile)
        .args(["--build-arg", &format!("VERSION={version}"), "--build-arg", &format!("REVISION={commit}")]);
    if let Some(source) = git_remote() {
        build.args(["--build-arg", &format!("SOURCE={source}")]);
    }
    // The classic builder: it builds from a base that exists only locally
    // without asking a registry, on every engine these machines have.
    let ok = build.arg(&context).env("DOCKER_BUILDKIT", "0").status().context("cannot run docker build")?.success();
    if !ok {
        bail!("docker build of {IMAGE} failed (see above)");
    }
    let id = capture(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", IMAGE]))?;
    println!("xtask image: built {IMAGE} ({}) on engine {engine}", id.trim());
    Ok(())
}

/// (version, commit) from `natfix --version` ("natfix 0.1.0 (b014499)"):
/// the image's labels say what its binary says.
fn binary_version(binary: &Path) -> Result<(String, String)> {
    let out = capture(Command::new(binary).arg("--version"))?;
    let rest = out.trim().strip_prefix("natfix ").with_context(|| format!("unexpected `natfix --version`: {out}"))?;
    let (version, commit) = rest.split_once(" (").with_context(|| format!("no commit in `natfix --version`: {out}"))?;
    Ok((version.to_owned(), commit.trim_end_matches(')').to_owned()))
}

/// The image named by the Dockerfile's `FROM`.
fn dockerfile_base(dockerfile: &Path) -> Result<String> {
    let text = std::fs::read_to_string(dockerfile).with_context(|| format!("cannot read {}", dockerfile.display()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("FROM "))
        .map(|b| b.split_whitespace().next().unwrap_or_default().to_owned())
        .with_context(|| format!("{} has no FROM", dockerfile.display()))
}

/// Makes `base` exist in the engine: present, pulled, or built and imported.
fn ensure_base(base: &str) -> Result<()> {
    if docker_ok(Command::new("docker").args(["image", "inspect", base])) {
        println!("xtask image: base {base} is in the engine");
        return Ok(());
    }
    match pull(base) {
        Ok(()) => {
            println!("xtask image: pulled {base}");
            return Ok(());
        }
        Err(e) => println!("xtask image: cannot pull {base} ({e:#}); building it from Debian packages"),
    }
    let rootfs = debian_rootfs(base)?;
    let ok = Command::new("docker")
        .arg("import")
        .args(["--change", r#"CMD ["bash"]"#])
        .args(["--change", "LABEL org.natfix.base=\"mmdebstrap minbase built by cargo xtask image (no registry reachable)\""])
        .arg(&rootfs)
        .arg(base)
        .stdout(Stdio::null())
        .status()
        .context("cannot run docker import")?
        .success();
    if !ok {
        bail!("docker import {} {base} failed", rootfs.display());
    }
    println!("xtask image: imported {} as {base}", rootfs.display());
    Ok(())
}

/// `docker pull`, given up after [`PULL_TIMEOUT`] (an unreachable registry
/// can hang on connect rather than fail).
fn pull(image: &str) -> Result<()> {
    let mut child = Command::new("docker")
        .args(["pull", "-q", image])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run docker pull")?;
    let end = Instant::now() + PULL_TIMEOUT;
    while Instant::now() < end {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            bail!("{}", err.trim());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!("no answer within {} s", PULL_TIMEOUT.as_secs())
}

/// A tarball of a Debian minbase root filesystem for `base`
/// (`debian:<suite>[-slim]`) with [`RUNTIME_PACKAGES`], built once and cached.
fn debian_rootfs(base: &str) -> Result<PathBuf> {
    let suite = base
        .strip_prefix("debian:")
        .map(|tag| tag.trim_end_matches("-slim"))
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase()))
        .with_context(|| format!("cannot build base {base} locally: only debian:<suite>[-slim] can be"))?;
    let dir = workspace().join("vm-cache/image");
    let tarball = dir.join(format!("{suite}-minbase-{}.tar", RUNTIME_PACKAGES.join("-")));
    if tarball.exists() {
        println!("xtask image: root filesystem cached in {}", tarball.display());
        return Ok(tarball);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if Command::new("mmdebstrap").arg("--version").output().is_err() {
        bail!("mmdebstrap is missing (`cargo xtask deps` installs it): no registry answers, so the base is built from Debian packages");
    }
    // Written aside and renamed: an interrupted build leaves no tarball that
    // looks complete. (mmdebstrap picks the format by the name: it ends in .tar.)
    let partial = tarball.with_extension("partial.tar");
    println!("xtask image: building a Debian {suite} root filesystem with mmdebstrap (once; about two minutes)");
    let ok = Command::new("mmdebstrap")
        .args(["--variant=minbase", "--quiet", &format!("--include={}", RUNTIME_PACKAGES.join(","))])
        // What debian:*-slim leaves out too: documentation, man pages, locales.
        .args(["--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*"])
        .args(["--dpkgopt=path-include=/usr/share/doc/*/copyright", "--dpkgopt=path-exclude=/usr/share/locale/*"])
        .arg(suite)
        .arg(&partial)
        .arg(format!("deb http://deb.debian.org/debian {suite} main"))
        .arg(format!("deb http://deb.debian.org/debian {suite}-updates main"))
        .arg(format!("deb http://deb.debian.org/debian-security {suite}-security main"))
        .status()
        .context("cannot run mmdebstrap")?
        .success();
    if !ok {
        let _ = std::fs::remove_file(&partial);
        bail!("mmdebstrap {suite} failed (see above)");
    }
    std::fs::rename(&partial, &tarball).with_context(|| format!("cannot rename {} into place", partial.display()))?;
    Ok(tarball)
}

/// The checkout's `origin`, for the image's source label; none outside a clone.
fn git_remote() -> Option<String> {
    let out = Command::new("git").args(["remote", "get-url", "origin"]).current_dir(workspace()).stderr(Stdio::null()).output().ok()?;
    let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !url.is_empty()).then_some(url)
}

fn docker_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// A command's stdout; its stderr in the error when it fails.
fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
