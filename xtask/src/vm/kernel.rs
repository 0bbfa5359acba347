//! Kernels to boot: Debian's kernel packages (fetched with apt-get and unpacked once), or a
//! bzImage / unpacked package given by path.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};

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

/// A kernel given by path: a bzImage (with `modules`: a lib/modules/<version> directory or a
/// root holding one), a kernel .deb, or a directory holding an unpacked kernel .deb.
pub(super) fn kernel_at(path: &Path, modules: Option<&Path>, cache: &Path) -> Result<Kernel> {
    // Absolute paths: the initramfs cache key contains them.
    let path = &fs::canonicalize(path).with_context(|| format!("--kernel {} does not exist", path.display()))?;
    let modules_arg = match modules {
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

/// A line of Debian's kernel packages for bookworm.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Line {
    /// `linux-image-6.1.0-N-<flavour>` (bookworm and bookworm-security; N is the ABI).
    V6_1,
    /// `linux-image-6.12.P+deb12-<flavour>` (bookworm-security only; P is the patch level).
    V6_12,
}

impl Line {
    pub(super) const fn name(self) -> &'static str {
        match self {
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
        }
    }

    /// The `apt-cache search --names-only` pattern of the line's packages of `flavour`.
    fn pattern(self, flavour: Flavour) -> String {
        let flavour = flavour.name();
        match self {
            Self::V6_1 => format!(r"^linux-image-6\.1\.0-[0-9]+-{flavour}$"),
            Self::V6_12 => format!(r"^linux-image-6\.12\.[0-9]+\+deb12-{flavour}$"),
        }
    }

    /// The sort key of `package` if it belongs to the line and flavour: the ABI number (6.1) or
    /// the patch level (6.12).
    fn key(self, package: &str, flavour: Flavour) -> Option<u32> {
        let flavour = flavour.name();
        let number = match self {
            Self::V6_1 => package.strip_prefix("linux-image-6.1.0-")?.strip_suffix(&format!("-{flavour}"))?,
            Self::V6_12 => package.strip_prefix("linux-image-6.12.")?.strip_suffix(&format!("+deb12-{flavour}"))?,
        };
        number.parse().ok()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Flavour {
    Amd64,
    CloudAmd64,
}

impl Flavour {
    pub(super) const fn name(self) -> &'static str {
        match self {
            Self::Amd64 => "amd64",
            Self::CloudAmd64 => "cloud-amd64",
        }
    }
}

/// A Debian kernel to fetch: `6.1`, `6.12`, `6.1-cloud`, `6.12-cloud`; `-oldest` picks the
/// oldest package of the line still served instead of the newest.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct DebianKernel {
    pub(super) line: Line,
    pub(super) flavour: Flavour,
    pub(super) oldest: bool,
}

impl DebianKernel {
    pub(super) const fn newest(line: Line, flavour: Flavour) -> Self {
        Self { line, flavour, oldest: false }
    }

    /// The package among `names` (package names) this spec picks.
    fn pick<'a>(self, names: impl Iterator<Item = &'a str>) -> Option<String> {
        let keyed = names.filter_map(|name| self.line.key(name, self.flavour).map(|key| (key, name.to_owned())));
        let picked = if self.oldest { keyed.min() } else { keyed.max() };
        picked.map(|(_, name)| name)
    }
}

impl std::str::FromStr for DebianKernel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut words = s.split('-');
        let line = match words.next() {
            Some("6.1") => Line::V6_1,
            Some("6.12") => Line::V6_12,
            _ => return Err(format!("`{s}`: expected 6.1 or 6.12, then -cloud and/or -oldest (e.g. 6.12-cloud)")),
        };
        let mut spec = Self::newest(line, Flavour::Amd64);
        for word in words {
            match word {
                "cloud" => spec.flavour = Flavour::CloudAmd64,
                "oldest" => spec.oldest = true,
                other => return Err(format!("`{s}`: unknown word `{other}` (cloud, oldest)")),
            }
        }
        Ok(spec)
    }
}

impl std::fmt::Display for DebianKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.line.name())?;
        if self.flavour == Flavour::CloudAmd64 {
            write!(f, "-cloud")?;
        }
        if self.oldest {
            write!(f, "-oldest")?;
        }
        Ok(())
    }
}

/// The package `spec` names today (asking apt-cache, with one `apt-get update` if it knows
/// none), fetched and unpacked once into `cache`/debian/<package>.
pub(super) fn debian_kernel(cache: &Path, spec: DebianKernel) -> Result<(String, Kernel)> {
    let dir = cache.join("debian");
    let what = format!("{} package of line {} ({})", if spec.oldest { "oldest" } else { "newest" }, spec.line.name(), spec.flavour.name());
    let package = match served_kernel(spec) {
        Ok(Some(p)) => p,
        Ok(None) => {
            eprintln!("vm: apt-cache knows no {what}; running apt-get update");
            run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
            served_kernel(spec)?.with_context(|| format!("apt-cache finds no {what}"))?
        }
        Err(e) => {
            // Offline: fall back to a kernel already unpacked.
            let cached = cached_kernel(&dir, spec).with_context(|| format!("{e:#}; and no kernel in {}", dir.display()))?;
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
    Ok((package, kernel_from_root(&pkg_dir.join("root"))?))
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

/// The package of `spec` among those apt knows (None: apt knows none of the line).
fn served_kernel(spec: DebianKernel) -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only", &spec.line.pattern(spec.flavour)])
        .output()
        .context("cannot run apt-cache")?;
    ensure!(out.status.success(), "apt-cache search failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(pick_kernel(&String::from_utf8_lossy(&out.stdout), spec))
}

/// The package `spec` picks from `apt-cache search` output.
fn pick_kernel(apt_cache_output: &str, spec: DebianKernel) -> Option<String> {
    spec.pick(apt_cache_output.lines().filter_map(|l| l.split_whitespace().next()))
}

/// The package `spec` picks among those already unpacked in `dir`.
fn cached_kernel(dir: &Path, spec: DebianKernel) -> Option<String> {
    let names: Vec<String> = fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.path().join(".unpacked").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    spec.pick(names.iter().map(String::as_str))
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

    fn spec(s: &str) -> DebianKernel {
        s.parse().unwrap()
    }

    #[test]
    fn picks_the_highest_abi_not_the_last_line() {
        let out =
            "linux-image-6.1.0-9-amd64 - Linux 6.1\nlinux-image-6.1.0-56-amd64 - x\nlinux-image-6.1.0-47-amd64 - y\n";
        assert_eq!(pick_kernel(out, spec("6.1")).as_deref(), Some("linux-image-6.1.0-56-amd64"));
        assert_eq!(pick_kernel(out, spec("6.1-oldest")).as_deref(), Some("linux-image-6.1.0-9-amd64"));
        assert_eq!(pick_kernel("linux-image-6.1.0-56-rt-amd64 - rt\n", spec("6.1")), None);
        assert_eq!(
            pick_kernel("linux-image-6.1.0-55-cloud-amd64 - c\nlinux-image-6.1.0-56-amd64 - a\n", spec("6.1-cloud")).as_deref(),
            Some("linux-image-6.1.0-55-cloud-amd64")
        );
    }

    #[test]
    fn the_6_12_line_sorts_by_patch_level_and_keeps_flavours_apart() {
        let out = "linux-image-6.12.99+deb12-amd64 - a\nlinux-image-6.12.118+deb12-amd64 - b\n\
                   linux-image-6.12.100+deb12-amd64 - c\nlinux-image-6.12.120+deb12-cloud-amd64 - d\n\
                   linux-image-6.12.121+deb12-rt-amd64 - e\nlinux-image-6.1.0-57-amd64 - f\n";
        assert_eq!(pick_kernel(out, spec("6.12")).as_deref(), Some("linux-image-6.12.118+deb12-amd64"));
        assert_eq!(pick_kernel(out, spec("6.12-oldest")).as_deref(), Some("linux-image-6.12.99+deb12-amd64"));
        assert_eq!(pick_kernel(out, spec("6.12-cloud")).as_deref(), Some("linux-image-6.12.120+deb12-cloud-amd64"));
        assert_eq!(pick_kernel(out, spec("6.1")).as_deref(), Some("linux-image-6.1.0-57-amd64"));
    }

    #[test]
    fn debian_kernel_specs_parse_and_print_back() {
        for s in ["6.1", "6.12", "6.1-cloud", "6.12-cloud", "6.1-oldest", "6.12-cloud-oldest"] {
            assert_eq!(spec(s).to_string(), s);
        }
        assert_eq!(spec("6.12-oldest-cloud"), spec("6.12-cloud-oldest"));
        assert!("6.6".parse::<DebianKernel>().is_err());
        assert!("6.1-rt".parse::<DebianKernel>().is_err());
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
