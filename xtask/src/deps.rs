//! Installs missing Debian packages (the machines start without them).

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Package -> a file whose presence shows it is installed.
pub const PACKAGES: &[(&str, &str)] = &[
    ("clang-19", "/usr/bin/clang-19"),
    ("llvm-19", "/usr/bin/llvm-objdump-19"),
    ("libbpf-dev", "/usr/include/bpf/bpf_helpers.h"),
    ("linux-libc-dev", "/usr/include/linux/bpf.h"),
    ("bpftool", "/usr/sbin/bpftool"),
    ("iproute2", "/usr/sbin/ip"),
    ("nftables", "/usr/sbin/nft"),
    ("iptables", "/usr/sbin/iptables"),
    ("conntrack", "/usr/sbin/conntrack"),
    ("kmod", "/usr/sbin/depmod"),
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("cpio", "/usr/bin/cpio"),
    // Debian's 6.12 kernels ship their modules as .ko.xz; the VM's initramfs stores them unpacked.
    ("xz-utils", "/usr/bin/xz"),
    ("ethtool", "/usr/sbin/ethtool"),
    ("iperf3", "/usr/bin/iperf3"),
    ("prometheus", "/usr/bin/promtool"),
    ("iputils-ping", "/usr/bin/ping"),
    ("socat", "/usr/bin/socat"),
    // The runtime image and its tests: the engine, Compose to check
    // deploy/compose.yml, mmdebstrap for a base image where no registry is.
    ("docker.io", "/usr/sbin/dockerd"),
    ("docker-compose", "/usr/bin/docker-compose"),
    ("mmdebstrap", "/usr/bin/mmdebstrap"),
    // systemd-analyze verify checks deploy/natfix.service.
    ("systemd", "/usr/bin/systemd-analyze"),
];

pub fn install() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, probe)| !std::path::Path::new(probe).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        println!("xtask deps: all {} packages present", PACKAGES.len());
        return Ok(());
    }
    println!("xtask deps: installing {}", missing.join(" "));
    let update = Command::new("apt-get").args(["update", "-qq"]).status().context("cannot run apt-get")?;
    if !update.success() {
        bail!("apt-get update failed");
    }
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get")?
        .success();
    if !ok {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}
