//! Kernel modules the scenarios need: modules.dep / softdep / alias of a kernel, the closure of
//! the wanted modules, and their place in the initramfs.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    fs,
    path::Path,
};

use anyhow::{Context, Result};

use super::{
    initramfs::{Source, Tree},
    kernel::Kernel,
};


/// Kernel modules the scenarios need; their dependencies (modules.dep) and soft dependencies
/// (modules.softdep, resolved through modules.alias) are added. Names that are built in are
/// reported and skipped.
const MODULES: &[&str] = &[
    // ESP and the xfrm netlink API `ip xfrm` uses.
    "xfrm_algo",
    "xfrm_user",
    "esp4",
    // GRO path of ESP: not auto-loaded for SAs without hardware offload.
    "esp4_offload",
    "esp6",
    "esp6_offload",
    // rfc4106(gcm(aes)), and the IV generators whose salt comes from the default RNG (drbg).
    "aes_generic",
    "gcm",
    "ghash_generic",
    "ctr",
    "seqiv",
    "echainiv",
    "drbg",
    "jitterentropy_rng",
    // The default stdrng is drbg_nopr_hmac_sha512; jitterentropy (its seed) conditions with SHA3.
    "sha512_generic",
    "sha3_generic",
    // The overlay and the namespaces' links.
    "veth",
    "vxlan",
    "udp_tunnel",
    "ip6_udp_tunnel",
    // The 1:1 NAT router and the nftables fix (`meta ipsec` is nf_tables' meta; nft_xfrm is
    // the `ipsec in ...` expression).
    "nfnetlink",
    "nf_tables",
    "nf_conntrack",
    "nf_defrag_ipv4",
    "nf_defrag_ipv6",
    "nf_nat",
    "nft_chain_nat",
    // The guard scenario's masquerading host, and ctnetlink (natfix reads conntrack over netlink).
    "nft_masq",
    "nf_conntrack_netlink",
    "nft_nat",
    "nft_ct",
    "nft_xfrm",
    // natfix's tc attachment on kernels < 6.6 (clsact qdisc + cls_bpf).
    "sch_ingress",
    "cls_bpf",
];


fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Path inside the initramfs: compressed modules are stored decompressed (busybox insmod
/// cannot be relied on to decompress).
fn uncompressed_path(path: &str) -> String {
    for ext in [".xz", ".zst", ".gz"] {
        if let Some(p) = path.strip_suffix(ext) {
            return p.to_owned();
        }
    }
    path.to_owned()
}

struct ModuleDb {
    /// name -> (path relative to lib/modules/<version>, dependency names)
    modules: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
    /// name -> soft dependencies (module names or aliases)
    softdeps: HashMap<String, Vec<String>>,
    /// exact alias -> module names
    aliases: HashMap<String, Vec<String>>,
    alias_lines: Vec<(String, String)>,
}

impl ModuleDb {
    fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
        let dep_text = fs::read_to_string(dir.join("modules.dep"))
            .with_context(|| format!("no modules.dep in {}", dir.display()))?;
        Ok(Self::parse(&dep_text, &read("modules.builtin"), &read("modules.softdep"), &read("modules.alias")))
    }

    fn parse(dep: &str, builtin: &str, softdep: &str, alias: &str) -> Self {
        let modules = dep
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(path, deps)| {
                (module_name(path), (path.to_owned(), deps.split_whitespace().map(module_name).collect()))
            })
            .collect();
        let builtin = builtin.lines().filter(|l| !l.is_empty()).map(module_name).collect();
        let mut softdeps: HashMap<String, Vec<String>> = HashMap::new();
        for line in softdep.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(name) = words.next() else { continue };
            let deps = words.filter(|w| !w.ends_with(':')).map(str::to_owned);
            softdeps.entry(module_name(name)).or_default().extend(deps);
        }
        let mut aliases: HashMap<String, Vec<String>> = HashMap::new();
        let mut alias_lines = Vec::new();
        for line in alias.lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(a), Some(m)) = (words.next(), words.next(), words.next()) {
                aliases.entry(a.to_owned()).or_default().push(module_name(m));
                alias_lines.push((a.to_owned(), module_name(m)));
            }
        }
        Self { modules, builtin, softdeps, aliases, alias_lines }
    }

    /// The modules to load for `wanted`, dependencies first; plus the wanted names that are
    /// built in and those that exist neither way.
    fn closure(&self, wanted: &[&str]) -> (Vec<String>, Vec<String>, Vec<String>) {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        let (mut builtin, mut missing) = (Vec::new(), Vec::new());
        for name in wanted {
            let name = module_name(name);
            if self.modules.contains_key(&name) {
                self.visit(&name, &mut seen, &mut order);
            } else if self.builtin.contains(&name) {
                builtin.push(name);
            } else {
                missing.push(name);
            }
        }
        (order, builtin, missing)
    }

    fn visit(&self, name: &str, seen: &mut HashSet<String>, order: &mut Vec<String>) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        for soft in self.softdeps.get(name).into_iter().flatten() {
            let soft_name = module_name(soft);
            if self.modules.contains_key(&soft_name) {
                self.visit(&soft_name, seen, order);
            } else {
                // An alias may name several implementations: the generic one works on any CPU.
                let targets: Vec<&String> = self
                    .aliases
                    .get(soft.as_str())
                    .into_iter()
                    .flatten()
                    .filter(|t| self.modules.contains_key(*t))
                    .collect();
                let generic: Vec<&String> = targets.iter().copied().filter(|t| t.ends_with("_generic")).collect();
                for target in if generic.is_empty() { targets } else { generic } {
                    self.visit(target, seen, order);
                }
            }
        }
        if let Some((_, deps)) = self.modules.get(name) {
            for dep in deps {
                self.visit(dep, seen, order);
            }
        }
        order.push(name.to_owned());
    }
}
// ---------------------------------------------------------------------------------------------
// Into the initramfs

/// Adds the modules the scenarios need, their dependency files and /etc/natfix/modules (the
/// load order for /init). Returns the wanted modules that are built in.
pub(super) fn add_modules(tree: &mut Tree, kernel: &Kernel) -> Result<Vec<String>> {
    let Some(dir) = &kernel.modules else {
        tree.add("etc/natfix/modules", Source::Bytes(Vec::new()), 0o644);
        return Ok(Vec::new());
    };
    let db = ModuleDb::load(dir)?;
    let (order, builtin, missing) = db.closure(MODULES);
    if !missing.is_empty() {
        eprintln!("vm: warning: modules neither built in nor present: {}", missing.join(" "));
    }
    let base = format!("lib/modules/{}", kernel.version);
    let included: HashSet<&String> = order.iter().collect();
    let (mut load_list, mut dep_file) = (String::new(), String::new());
    for name in &order {
        let (rel, deps) = &db.modules[name];
        let stored = uncompressed_path(rel);
        tree.add(&format!("{base}/{stored}"), Source::Module(dir.join(rel)), 0o644);
        load_list.push_str(&stored);
        load_list.push('\n');
        let dep_paths: Vec<String> = deps.iter().map(|d| uncompressed_path(&db.modules[d].0)).collect();
        let _ = writeln!(dep_file, "{stored}: {}", dep_paths.join(" "));
    }
    // Aliases and soft dependencies of the included modules, for the kernel's modprobe calls.
    let mut alias_file = String::new();
    for (alias, module) in &db.alias_lines {
        if included.contains(module) && !alias.contains(['*', '?', '[']) {
            let _ = writeln!(alias_file, "alias {alias} {module}");
        }
    }
    let mut softdep_file = String::new();
    for name in &order {
        if let Some(deps) = db.softdeps.get(name) {
            let _ = writeln!(softdep_file, "softdep {name} pre: {}", deps.join(" "));
        }
    }
    tree.add(&format!("{base}/modules.dep"), Source::Bytes(dep_file.into_bytes()), 0o644);
    tree.add(&format!("{base}/modules.alias"), Source::Bytes(alias_file.into_bytes()), 0o644);
    tree.add(&format!("{base}/modules.softdep"), Source::Bytes(softdep_file.into_bytes()), 0o644);
    if dir.join("modules.builtin").is_file() {
        tree.add(&format!("{base}/modules.builtin"), Source::Host(dir.join("modules.builtin")), 0o644);
    }
    tree.add("etc/natfix/modules", Source::Bytes(load_list.into_bytes()), 0o644);
    eprintln!(
        "vm: {} module files; built in: {}",
        order.len(),
        if builtin.is_empty() { "none of the wanted".to_owned() } else { builtin.join(" ") }
    );
    Ok(builtin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_closure_puts_dependencies_and_softdeps_first() {
        let dep = "kernel/a/nf_conntrack.ko.xz: kernel/lib/libcrc32c.ko.xz\nkernel/lib/libcrc32c.ko.xz:\n\
                   kernel/crypto/crc32c_generic.ko.xz:\nkernel/crypto/ghash-generic.ko.xz:\n";
        let db = ModuleDb::parse(
            dep,
            "kernel/crypto/aes_generic.ko\n",
            "softdep libcrc32c pre: crc32c\n",
            "alias crc32c crc32c_intel\nalias crc32c crc32c_generic\n",
        );
        let (order, builtin, missing) = db.closure(&["nf_conntrack", "ghash_generic", "aes_generic", "nope"]);
        assert_eq!(order, ["crc32c_generic", "libcrc32c", "nf_conntrack", "ghash_generic"]);
        assert_eq!(builtin, ["aes_generic"]);
        assert_eq!(missing, ["nope"]);
        assert_eq!(uncompressed_path("kernel/a/x.ko.xz"), "kernel/a/x.ko");
    }
}
