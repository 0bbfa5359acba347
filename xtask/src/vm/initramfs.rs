//! The VM's initramfs: a newc cpio writer, the tree of files it holds (busybox, iproute2 & co.
//! with their libraries, natfix, the scenario scripts, the kernel's modules), cached by a
//! fingerprint of its inputs, plus a small per-run archive with the run's settings.

use std::{
    collections::BTreeMap,
    fs,
    hash::{DefaultHasher, Hash, Hasher},
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, UNIX_EPOCH},
};

use anyhow::{Context, Result, ensure};

use super::{kernel::Kernel, modules::add_modules};

/// Host programs copied into the initramfs (with their shared libraries), and where to look.
const HOST_PROGRAMS: &[(&str, &[&str])] = &[
    ("ip", &["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]),
    ("nft", &["/usr/sbin/nft", "/sbin/nft"]),
    ("ethtool", &["/usr/sbin/ethtool", "/sbin/ethtool"]),
    // natfix runs `tc` to manage clsact qdiscs on kernels without tcx.
    ("tc", &["/usr/sbin/tc", "/sbin/tc"]),
    // Overlay throughput (mode `throughput`).
    ("iperf3", &["/usr/bin/iperf3"]),
    // UDP datagrams from chosen ports (scenario guard); busybox nc has no UDP.
    ("socat", &["/usr/bin/socat"]),
];

/// Bump when the initramfs layout changes, to invalidate cached images.
const INITRAMFS_FORMAT: u32 = 1;

/// Where an initramfs entry's content comes from.
pub(super) enum Source {
    Dir,
    /// A host file, copied as is (symlinks followed).
    Host(PathBuf),
    /// A kernel module, decompressed if needed.
    Module(PathBuf),
    /// A host executable with its debug sections stripped (natfix's debug build is ~65 MB).
    Stripped(PathBuf),
    Bytes(Vec<u8>),
    Symlink(String),
    CharDev(u32, u32),
}

struct Entry {
    source: Source,
    mode: u32,
}

/// The initramfs content, by path without the leading `/` (`BTreeMap` order puts every
/// directory before its children, as the kernel's unpacker needs).
#[derive(Default)]
pub(super) struct Tree {
    entries: BTreeMap<String, Entry>,
}

impl Tree {
    pub(super) fn add(&mut self, path: &str, source: Source, mode: u32) {
        let path = path.trim_start_matches('/').to_owned();
        let mut parent = Path::new(&path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            self.entries.entry(p.to_string_lossy().into_owned()).or_insert(Entry { source: Source::Dir, mode: 0o755 });
            parent = p.parent();
        }
        self.entries.insert(path, Entry { source, mode });
    }

    /// A key that changes when any input changes: paths, sizes and mtimes of host files.
    fn fingerprint(&self) -> String {
        let mut h = DefaultHasher::new();
        INITRAMFS_FORMAT.hash(&mut h);
        for (path, entry) in &self.entries {
            path.hash(&mut h);
            entry.mode.hash(&mut h);
            match &entry.source {
                Source::Dir => 0u8.hash(&mut h),
                Source::Host(p) | Source::Module(p) | Source::Stripped(p) => {
                    p.hash(&mut h);
                    if let Ok(meta) = fs::metadata(p) {
                        meta.len().hash(&mut h);
                        meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).hash(&mut h);
                    }
                }
                Source::Bytes(b) => b.hash(&mut h),
                Source::Symlink(t) => t.hash(&mut h),
                Source::CharDev(a, b) => (a, b).hash(&mut h),
            }
        }
        format!("{:016x}", h.finish())
    }

    /// Writes the tree as a newc cpio archive.
    fn write_cpio(&self, out: &mut impl Write, scratch: &Path) -> Result<()> {
        let mut cpio = Cpio::new(out);
        for (path, entry) in &self.entries {
            match &entry.source {
                Source::Dir => cpio.entry(path, 0o040_000 | entry.mode, &[], (0, 0))?,
                Source::Symlink(target) => cpio.entry(path, 0o120_000 | 0o777, target.as_bytes(), (0, 0))?,
                Source::CharDev(major, minor) => cpio.entry(path, 0o020_000 | entry.mode, &[], (*major, *minor))?,
                Source::Bytes(data) => cpio.entry(path, 0o100_000 | entry.mode, data, (0, 0))?,
                Source::Host(p) => {
                    let data = fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
                    cpio.entry(path, 0o100_000 | entry.mode, &data, (0, 0))?;
                }
                Source::Module(p) => cpio.entry(path, 0o100_000 | entry.mode, &read_module(p)?, (0, 0))?,
                Source::Stripped(p) => {
                    let data = stripped(p, scratch)?;
                    cpio.entry(path, 0o100_000 | entry.mode, &data, (0, 0))?;
                }
            }
        }
        cpio.finish()
    }
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    };
    let out = Command::new(tool).arg("-dc").arg(path).output().with_context(|| format!("cannot run {tool}"))?;
    ensure!(out.status.success(), "{tool} -dc {} failed", path.display());
    Ok(out.stdout)
}

fn stripped(path: &Path, scratch: &Path) -> Result<Vec<u8>> {
    let tmp = scratch.join("stripped.tmp");
    let ok =
        Command::new("strip").arg("--strip-debug").arg("-o").arg(&tmp).arg(path).status().is_ok_and(|s| s.success());
    let data = fs::read(if ok { &tmp } else { path }).with_context(|| format!("cannot read {}", path.display()))?;
    let _ = fs::remove_file(&tmp);
    Ok(data)
}

/// newc ("070701") cpio writer; mtimes are 0 so that equal inputs give equal archives.
struct Cpio<'a, W: Write> {
    out: &'a mut W,
    ino: u32,
    written: u64,
}

impl<'a, W: Write> Cpio<'a, W> {
    fn new(out: &'a mut W) -> Self {
        Self { out, ino: 1, written: 0 }
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let n = usize::try_from((4 - self.written % 4) % 4).unwrap_or(0);
        self.put(&[0u8; 3][..n])
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) -> Result<()> {
        let size = u32::try_from(data.len()).context("file too large for cpio")?;
        let name_size = u32::try_from(name.len() + 1).context("name too long")?;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_size, 0
        );
        self.ino += 1;
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn finish(mut self) -> Result<()> {
        self.entry("TRAILER!!!", 0, &[], (0, 0))?;
        self.out.flush()?;
        Ok(())
    }
}

pub(super) struct Initramfs {
    pub(super) path: PathBuf,
    pub(super) rebuilt: bool,
    pub(super) builtin: Vec<String>,
}

fn find_program(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// Shared libraries of a dynamic executable, as the paths `ldd` resolves them to (the dynamic
/// loader included). Empty for static executables.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(exe).output().context("cannot run ldd")?;
    if !out.status.success() {
        return Ok(Vec::new()); // "not a dynamic executable"
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

pub(super) fn build_initramfs(workspace: &Path, cache: &Path, kernel: &Kernel, natfix: Option<&Path>) -> Result<Initramfs> {
    let mut tree = Tree::default();
    add_base(&mut tree)?;
    add_programs(&mut tree, natfix)?;
    add_scripts(&mut tree, &workspace.join("tests/vm"))?;
    let builtin = add_modules(&mut tree, kernel)?;

    let fingerprint = tree.fingerprint();
    let dir = cache.join("initramfs");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}-{fingerprint}.cpio.gz", kernel.version));
    if path.exists() {
        return Ok(Initramfs { path, rebuilt: false, builtin });
    }
    let started = Instant::now();
    // Older images of this kernel are stale now.
    for old in fs::read_dir(&dir)?.filter_map(|e| e.ok().map(|e| e.path())) {
        if old.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{}-", kernel.version))) {
            let _ = fs::remove_file(old);
        }
    }
    write_gzip_cpio(&tree, &dir, &path)?;
    eprintln!(
        "vm: built {} ({:.1} MB) in {:.1} s",
        path.display(),
        f64::from(u32::try_from(fs::metadata(&path)?.len() / 1000).unwrap_or(u32::MAX)) / 1e3,
        started.elapsed().as_secs_f64()
    );
    Ok(Initramfs { path, rebuilt: true, builtin })
}

/// The directories, /dev/console, and busybox with a link per applet.
fn add_base(tree: &mut Tree) -> Result<()> {
    for dir in ["proc", "sys", "dev", "run", "tmp", "root", "etc", "sbin", "usr/bin", "usr/sbin", "var"] {
        tree.add(dir, Source::Dir, 0o755);
    }
    // The kernel opens /dev/console before /init runs (devtmpfs is mounted later).
    tree.add("dev/console", Source::CharDev(5, 1), 0o600);
    tree.add("var/run", Source::Symlink("/run".into()), 0o777);

    // busybox, with a link per applet; /sbin/modprobe is what the kernel calls.
    let busybox = find_program(&["/bin/busybox", "/usr/bin/busybox"]).context("busybox-static is not installed")?;
    tree.add("bin/busybox", Source::Host(busybox.clone()), 0o755);
    let applets = Command::new(&busybox).arg("--list").output().context("cannot run busybox --list")?;
    let replaced: Vec<&str> = HOST_PROGRAMS.iter().map(|(name, _)| *name).collect();
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let skip = ["", "busybox", "init", "linuxrc"].contains(&applet) || replaced.contains(&applet);
        if !skip {
            tree.add(&format!("bin/{applet}"), Source::Symlink("busybox".into()), 0o777);
        }
    }
    for applet in ["modprobe", "insmod", "poweroff"] {
        tree.add(&format!("sbin/{applet}"), Source::Symlink("/bin/busybox".into()), 0o777);
    }
    Ok(())
}

/// The host programs and natfix, with their shared libraries.
fn add_programs(tree: &mut Tree, natfix: Option<&Path>) -> Result<()> {
    let mut executables = Vec::new();
    for (name, candidates) in HOST_PROGRAMS {
        let path = find_program(candidates).with_context(|| format!("{name} is not installed (cargo xtask deps)"))?;
        tree.add(&format!("usr/sbin/{name}"), Source::Host(path.clone()), 0o755);
        executables.push(path);
    }
    if let Some(natfix) = natfix {
        tree.add("usr/bin/natfix", Source::Stripped(natfix.to_path_buf()), 0o755);
        executables.push(natfix.to_path_buf());
    }
    for exe in &executables {
        for lib in shared_libraries(exe)? {
            // Same path as on the host: the dynamic loader's default search finds it there.
            let path = lib.to_string_lossy().into_owned();
            tree.add(&path, Source::Host(lib), 0o755);
        }
    }
    if Path::new("/etc/protocols").is_file() {
        tree.add("etc/protocols", Source::Host("/etc/protocols".into()), 0o644);
    }
    Ok(())
}

/// Scenario scripts: init.sh is /init, the rest go to /scenarios.
fn add_scripts(tree: &mut Tree, scripts: &Path) -> Result<()> {
    let mut found_init = false;
    for entry in fs::read_dir(scripts).with_context(|| format!("cannot read {}", scripts.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else { continue };
        if path.extension().is_none_or(|e| e != "sh") {
            continue;
        }
        if name == "init.sh" {
            found_init = true;
            tree.add("init", Source::Host(path), 0o755);
        } else {
            tree.add(&format!("scenarios/{name}"), Source::Host(path), 0o755);
        }
    }
    ensure!(found_init, "{} has no init.sh", scripts.display());
    Ok(())
}

/// Writes `tree` as a gzip-compressed cpio to `path` (through a temporary file in `dir`).
fn write_gzip_cpio(tree: &Tree, dir: &Path, path: &Path) -> Result<()> {
    let tmp = dir.join(format!(".tmp-{}", std::process::id()));
    let mut gzip = Command::new("gzip")
        .args(["-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&tmp)?)
        .spawn()
        .context("cannot run gzip")?;
    {
        let mut stdin = std::io::BufWriter::new(gzip.stdin.take().context("gzip stdin")?);
        tree.write_cpio(&mut stdin, dir)?;
    }
    ensure!(gzip.wait()?.success(), "gzip failed");
    fs::rename(&tmp, path)?;
    Ok(())
}

/// Run images left by interrupted runs (older than an hour: a concurrent run may own newer ones).
pub(super) fn remove_stale_run_images(cache: &Path) {
    let Ok(entries) = fs::read_dir(cache) else { return };
    for entry in entries.filter_map(Result::ok) {
        let stale = entry.file_name().to_string_lossy().starts_with("initrd-run-")
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > Duration::from_hours(1)));
        if stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The cached initramfs plus a small uncompressed cpio with this run's settings (the kernel
/// unpacks concatenated archives in order; an uncompressed one must start 4-byte aligned).
pub(super) fn write_run_initrd(base: &Path, natfix_args: &[String], out: &Path) -> Result<()> {
    let mut image = fs::read(base).with_context(|| format!("cannot read {}", base.display()))?;
    image.resize(image.len().next_multiple_of(4), 0);
    let mut args = String::new();
    for arg in natfix_args {
        ensure!(!arg.contains('\n'), "--natfix-arg values cannot contain newlines");
        args.push_str(arg);
        args.push('\n');
    }
    let mut tree = Tree::default();
    tree.add("etc/natfix/natfix-args", Source::Bytes(args.into_bytes()), 0o644);
    tree.write_cpio(&mut image, out.parent().unwrap_or(Path::new(".")))?;
    fs::write(out, image).with_context(|| format!("cannot write {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_and_loader_paths() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            parse_ldd(out),
            [PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"), PathBuf::from("/lib64/ld-linux-x86-64.so.2")]
        );
    }

    #[test]
    fn cpio_entries_are_aligned_and_parents_come_first() {
        let mut tree = Tree::default();
        tree.add("/usr/bin/x", Source::Bytes(b"abcde".to_vec()), 0o755);
        assert_eq!(tree.entries.keys().collect::<Vec<_>>(), ["usr", "usr/bin", "usr/bin/x"]);
        let mut out = Vec::new();
        tree.write_cpio(&mut out, Path::new("/tmp")).unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("usr/bin/x\0"));
        assert!(text.contains("TRAILER!!!"));
    }
}
