//! `cargo xtask lab` and `cargo xtask test`: set-up plus the real work.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::deps;

#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip the qemu VM scenarios (they take minutes under TCG).
    #[arg(long)]
    pub no_vm: bool,
}

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn require_root() -> Result<()> {
    let uid = Command::new("id").arg("-u").output().context("id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!("natfix's lab and tests create network namespaces and load eBPF: run as root (sudo -E cargo xtask ...)");
    }
    Ok(())
}

/// bpffs at /sys/fs/bpf: fresh machines boot without it.
fn ensure_bpffs() -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/mounts")?.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
    if !mounted {
        let ok = Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status()?.success();
        if !ok {
            bail!("cannot mount bpffs at /sys/fs/bpf");
        }
    }
    Ok(())
}

pub fn cargo(args: &[&str]) -> Result<()> {
    let ok = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(workspace())
        .status()
        .with_context(|| format!("cargo {}", args.join(" ")))?
        .success();
    if !ok {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

pub fn setup() -> Result<()> {
    require_root()?;
    deps::install()?;
    ensure_bpffs()?;
    cargo(&["build", "-p", "natfix"])
}

pub fn lab() -> Result<()> {
    setup()?;
    let ok = Command::new(workspace().join("target/debug/natfix")).arg("lab").status()?.success();
    if !ok {
        bail!("natfix lab failed");
    }
    Ok(())
}

pub fn test(args: &TestArgs) -> Result<()> {
    setup()?;
    cargo(&["test", "--workspace", "--no-fail-fast"])?;
    if !args.no_vm {
        cargo(&["test", "-p", "natfix-tests", "--test", "vm_esp", "--", "--ignored", "--test-threads=1"])?;
    }
    Ok(())
}
