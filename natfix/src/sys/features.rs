//! What this process may do and what the running kernel offers, checked
//! before anything is loaded so that failures say what is missing.

use anyhow::{Result, bail};
use aya::util::KernelVersion;

use crate::error::UserError;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Effective capability bits of this process (from /proc/self/status).
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// `CAP_NET_ADMIN` and `CAP_BPF` (or `CAP_SYS_ADMIN`); `CAP_SYS_ADMIN` also to enter another namespace.
pub fn require_privileges(enter_netns: bool) -> Result<()> {
    let caps = effective_caps();
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if enter_netns && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_SYS_ADMIN (to enter --netns)");
    }
    if !missing.is_empty() {
        bail!(UserError::Privilege(format!(
            "missing {}: run as root, or in a container with --cap-add NET_ADMIN --cap-add SYS_ADMIN (README.md, \"Deploy\")",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// tc programs attach through tcx links on >= 6.6 (as aya decides), clsact below.
#[must_use]
pub fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Where the conntrack lookup kfuncs are, if anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtKfuncs {
    /// In vmlinux BTF: callable after natfix's object fix-up.
    Vmlinux,
    /// Only in the `nf_conntrack` module's BTF: needs `fd_array`, which aya 0.14 cannot pass.
    Module,
    /// Not in this kernel (older than 5.18, or conntrack not built).
    Absent(String),
}

const CT_KFUNCS: [&str; 3] = ["bpf_xdp_ct_lookup", "bpf_skb_ct_lookup", "bpf_ct_release"];

#[must_use]
pub fn ct_kfuncs() -> CtKfuncs {
    let vmlinux = match aya_obj::btf::Btf::from_sys_fs() {
        Ok(btf) => btf,
        Err(e) => return CtKfuncs::Absent(format!("kernel BTF unreadable ({e})")),
    };
    let in_vmlinux = CT_KFUNCS
        .iter()
        .all(|f| vmlinux.id_by_type_name_kind(f, aya_obj::btf::BtfKind::Func).is_ok());
    if in_vmlinux {
        CtKfuncs::Vmlinux
    } else if std::path::Path::new("/sys/kernel/btf/nf_conntrack").exists() {
        CtKfuncs::Module
    } else {
        CtKfuncs::Absent("the kernel's BTF has no bpf_xdp_ct_lookup (needs Linux >= 5.18 with conntrack)".into())
    }
}

/// Explanation for the user when conntrack kfuncs cannot be used.
#[must_use]
pub fn ct_kfuncs_unavailable_reason(ct: &CtKfuncs) -> Option<String> {
    match ct {
        CtKfuncs::Vmlinux => None,
        CtKfuncs::Module => Some(
            "conntrack is a module here: its kfuncs are in module BTF, which aya 0.14 cannot link (no fd_array)".into(),
        ),
        CtKfuncs::Absent(why) => Some(why.clone()),
    }
}

/// The kernel's `CONFIG_HZ`, for the data plane's jiffies windows
/// (`bpf-headers/natfix_clock.h`): `CLOCK_MONOTONIC_COARSE` advances once per
/// tick, so its resolution is 1/HZ. None if that looks implausible.
#[must_use]
pub fn kernel_hz() -> Option<u32> {
    let res = nix::time::clock_getres(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).ok()?;
    let ns = u64::try_from(res.tv_sec()).ok()? * 1_000_000_000 + u64::try_from(res.tv_nsec()).ok()?;
    if ns == 0 {
        return None;
    }
    let hz = (1_000_000_000 + ns / 2) / ns;
    (10..=10_000).contains(&hz).then(|| u32::try_from(hz).ok()).flatten()
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_hz_is_a_configurable_value() {
        // Kconfig offers 100, 250, 300 and 1000 on x86; others exist elsewhere.
        let hz = super::kernel_hz().expect("coarse clock resolution");
        assert!([24, 32, 48, 64, 100, 128, 200, 250, 256, 300, 500, 1000, 1024, 1200].contains(&hz), "HZ {hz}");
    }
}
