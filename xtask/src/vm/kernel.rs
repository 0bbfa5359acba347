//! Kernels to boot: Debian's kernel packages (fetched with apt-get and unpacked once), or a
//! bzImage / unpacked package given by path.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};

use super::VmArgs;

pub(super) struct Kernel {
    pub(super) image: PathBuf,
    pub(super) version: String,
    /// lib/modules/<version>, with modules.dep.
    pub(super) modules: Option<PathBuf>,
}

/// Kernel options the scenarios depend on (y: built in, m: module).
const CONFIG_SYMBOLS: &[&str] = &[
    "XFRM",
    "XFRM_USER",
    "XFRM_OFFLOAD",
    "INET_ESP",
    "INET_ESP_OFFLOAD",
    "CRYPTO_AES",
    "CRYPTO_GCM",
    "CRYPTO_GHASH",
    "CRYPTO_CTR",
    "CRYPTO_SEQIV",
    "CRYPTO_ECHAINIV",
    "VXLAN",
    "VETH",
    "NF_CONNTRACK",
    "NF_NAT",
    "NF_TABLES",
    "NF_TABLES_NETDEV",
    "NFT_NAT",
    "NFT_CT",
    "NFT_XFRM",
    "NET_SCH_INGRESS",
    "NET_CLS_BPF",
    "BPF_SYSCALL",
    "DEBUG_INFO_BTF",
];

/// `SYMBOL=value` for `CONFIG_SYMBOLS`, from the config file next to the image (Debian ships
/// boot/config-<version>).
pub(super) fn config_summary(kernel: &Kernel) -> Option<String> {
    let config = kernel.image.parent()?.join(format!("config-{}", kernel.version));
    let text = fs::read_to_string(config).ok()?;
    let values: HashMap<&str, &str> = text.lines().filter_map(|l| l.strip_prefix("CONFIG_")?.split_once('=')).collect();
    Some(
        CONFIG_SYMBOLS
            .iter()
            .map(|s| format!("{s}={}", values.get(s).copied().unwrap_or("n")))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

pub(super) fn resolve_kernel(args: &VmArgs, cache: &Path) -> Result<Kernel> {
    let Some(path) = &args.kernel else {
        return debian_kernel(cache);
    };
    // Absolute paths: the initramfs cache key contains them.
    let path = &fs::canonicalize(path).with_context(|| format!("--kernel {} does not exist", path.display()))?;
    let modules_arg = match &args.modules {
        Some(dir) => {
            Some(fs::canonicalize(dir).with_context(|| format!("--modules {} does not exist", dir.display()))?)
        }
        None => None,
    };
    if path.is_dir() {
        return kernel_from_root(path);
    }
    ensure!(path.is_file(), "--kernel {} does not exist", path.display());
    if path.extension().is_some_and(|e| e == "deb") {
        let stem = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let dir = cache.join("deb").join(stem);
        unpack_deb(path, &dir)?;
        return kernel_from_root(&dir.join("root"));
    }
    let version = bzimage_version(&fs::read(path).with_context(|| format!("cannot read {}", path.display()))?)
        .with_context(|| format!("{} is not a bzImage", path.display()))?;
    let modules = match &modules_arg {
        None => {
            eprintln!("vm: no --modules for {}: everything must be built in", path.display());
            None
        }
        Some(dir) if dir.join("modules.order").exists() || dir.join("kernel").is_dir() => Some(dir.clone()),
        Some(dir) => Some(dir.join("lib/modules").join(&version)),
    };
    if let Some(dir) = &modules {
        ensure_depmod(dir, &version)?;
    }
    Ok(Kernel { image: path.clone(), version, modules })
}

/// The version string of a bzImage (boot protocol: header field `kernel_version` at 0x20e).
fn bzimage_version(image: &[u8]) -> Option<String> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let offset = usize::from(u16::from_le_bytes([*image.get(0x20e)?, *image.get(0x20f)?])) + 0x200;
    let text = image.get(offset..)?;
    let end = text.iter().position(|&b| b == 0)?;
    let version = std::str::from_utf8(&text[..end]).ok()?.split_whitespace().next()?;
    Some(version.to_owned())
}

/// An unpacked kernel package: boot/vmlinuz-<version> and lib/modules/<version>.
fn kernel_from_root(root: &Path) -> Result<Kernel> {
    let boot = root.join("boot");
    let mut images: Vec<PathBuf> = fs::read_dir(&boot)
        .with_context(|| format!("{} has no boot/ directory", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .collect();
    images.sort();
    let image = images.pop().with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let version = image.file_name().unwrap_or_default().to_string_lossy()["vmlinuz-".len()..].to_owned();
    let modules = [root.join("lib/modules").join(&version), root.join("usr/lib/modules").join(&version)]
        .into_iter()
        .find(|p| p.is_dir());
    if let Some(dir) = &modules {
        ensure_depmod(dir, &version)?;
    }
    Ok(Kernel { image, version, modules })
}

/// Generates modules.dep & co. (kernel packages do not ship them; their postinst runs depmod).
fn ensure_depmod(modules: &Path, version: &str) -> Result<()> {
    if modules.join("modules.dep").exists() {
        return Ok(());
    }
    // depmod -b BASE looks in BASE/lib/modules/<version>.
    let base = modules.ancestors().nth(3).context("modules directory too shallow")?;
    run_cmd(Command::new("depmod").arg("-b").arg(base).arg(version))
}

fn debian_kernel(cache: &Path) -> Result<Kernel> {
    debian_kernel_flavour(cache, "amd64")
}

/// The newest `linux-image-6.1.0-N-<flavour>` (amd64, cloud-amd64), fetched and unpacked once.
pub(super) fn debian_kernel_flavour(cache: &Path, flavour: &str) -> Result<Kernel> {
    let dir = cache.join("debian");
    let package = match newest_debian_kernel(flavour) {
        Ok(Some(p)) => p,
        Ok(None) => {
            eprintln!("vm: apt-cache knows no linux-image-6.1.0-N-{flavour}; running apt-get update");
            run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
            newest_debian_kernel(flavour)?.with_context(|| format!("apt-cache finds no linux-image-6.1.0-N-{flavour} package"))?
        }
        Err(e) => {
            // Offline: fall back to the newest kernel already unpacked.
            let cached = newest_cached(&dir, flavour).with_context(|| format!("{e:#}; and no kernel in {}", dir.display()))?;
            eprintln!("vm: apt-cache failed ({e:#}); using cached {cached}");
            cached
        }
    };
    let pkg_dir = dir.join(&package);
    if !pkg_dir.join(".unpacked").exists() {
        fs::create_dir_all(&pkg_dir)?;
        eprintln!("vm: downloading {package}");
        run_cmd(Command::new("apt-get").args(["download", "-qq", &package]).current_dir(&pkg_dir))?;
        let deb = fs::read_dir(&pkg_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download left no .deb in {}", pkg_dir.display()))?;
        unpack_deb(&deb, &pkg_dir)?;
        fs::remove_file(&deb)?;
    }
    kernel_from_root(&pkg_dir.join("root"))
}

/// Unpacks a .deb into DIR/root once (DIR/.unpacked marks completion).
fn unpack_deb(deb: &Path, dir: &Path) -> Result<()> {
    let marker = dir.join(".unpacked");
    if marker.exists() {
        return Ok(());
    }
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    fs::create_dir_all(&root)?;
    eprintln!("vm: unpacking {}", deb.display());
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
    // Checks that it is a kernel package and runs depmod before marking it done.
    kernel_from_root(&root).with_context(|| format!("{} holds no kernel", deb.display()))?;
    fs::write(marker, b"")?;
    Ok(())
}

/// The highest ABI number among `linux-image-6.1.0-N-amd64` packages apt knows.
fn newest_debian_kernel(flavour: &str) -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only", &format!(r"^linux-image-6\.1\.0-[0-9]+-{flavour}$")])
        .output()
        .context("cannot run apt-cache")?;
    ensure!(out.status.success(), "apt-cache search failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(pick_newest_kernel(&String::from_utf8_lossy(&out.stdout), flavour))
}

fn kernel_abi(package: &str, flavour: &str) -> Option<u32> {
    package.strip_prefix("linux-image-6.1.0-")?.strip_suffix(&format!("-{flavour}"))?.parse().ok()
}

fn pick_newest_kernel(apt_cache_output: &str, flavour: &str) -> Option<String> {
    apt_cache_output
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| kernel_abi(name, flavour).map(|abi| (abi, name.to_owned())))
        .max()
        .map(|(_, name)| name)
}

fn newest_cached(dir: &Path, flavour: &str) -> Option<String> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.path().join(".unpacked").exists())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            kernel_abi(&name, flavour).map(|abi| (abi, name))
        })
        .max()
        .map(|(_, name)| name)
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot run {shown}"))?;
    ensure!(status.success(), "{shown} failed ({status})");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_highest_abi_not_the_last_line() {
        let out =
            "linux-image-6.1.0-9-amd64 - Linux 6.1\nlinux-image-6.1.0-56-amd64 - x\nlinux-image-6.1.0-47-amd64 - y\n";
        assert_eq!(pick_newest_kernel(out, "amd64").as_deref(), Some("linux-image-6.1.0-56-amd64"));
        assert_eq!(pick_newest_kernel("linux-image-6.1.0-56-rt-amd64 - rt\n", "amd64"), None);
        assert_eq!(
            pick_newest_kernel("linux-image-6.1.0-55-cloud-amd64 - c\nlinux-image-6.1.0-56-amd64 - a\n", "cloud-amd64").as_deref(),
            Some("linux-image-6.1.0-55-cloud-amd64")
        );
    }

    #[test]
    fn bzimage_version_is_read_from_the_setup_header() {
        let mut image = vec![0u8; 0x400];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        image[0x300..0x313].copy_from_slice(b"6.1.0-56-amd64 (x)\0");
        assert_eq!(bzimage_version(&image).as_deref(), Some("6.1.0-56-amd64"));
    }
}
