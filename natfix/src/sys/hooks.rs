//! What runs on an interface's hooks, as the kernel says: XDP programs
//! (rtnetlink), tcx programs in run order (`BPF_PROG_QUERY`), and `cls_bpf`
//! filters on a clsact qdisc in priority order (`tc -j filter show`). Read in
//! the calling thread's namespace.

use std::process::Command;

use anyhow::{Context, Result};
use aya::programs::{SchedClassifier, TcAttachType};

use super::{bpf, features, iface, rtnl};

/// One program on a hook.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HookProg {
    pub prog_id: u32,
    /// The kernel's name for it (at most 15 bytes).
    pub name: String,
}

impl HookProg {
    /// natfix's own programs all have names starting so.
    #[must_use]
    pub fn is_natfix(&self) -> bool {
        self.name.starts_with("natfix_")
    }
}

/// The programs on one interface's hooks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookView {
    pub xdp: Vec<HookProg>,
    /// In the order they run.
    pub tc_ingress: Vec<HookProg>,
    pub tc_egress: Vec<HookProg>,
}

impl HookView {
    /// Every natfix program on the interface.
    pub fn natfix_progs(&self) -> impl Iterator<Item = &HookProg> {
        self.xdp.iter().chain(&self.tc_ingress).chain(&self.tc_egress).filter(|p| p.is_natfix())
    }
}

fn named(prog_id: u32) -> HookProg {
    HookProg { prog_id, name: bpf::prog_name(prog_id).unwrap_or_default() }
}

/// The view of interface `ifindex`.
pub fn view(ifindex: u32) -> Result<HookView> {
    let name = iface::name_of(ifindex).with_context(|| format!("no interface with index {ifindex}"))?;
    let xdp = rtnl::xdp_progs(ifindex).with_context(|| format!("cannot read {name}'s XDP programs"))?;
    let (tc_ingress, tc_egress) = if features::has_tcx() {
        (tcx(&name, TcAttachType::Ingress)?, tcx(&name, TcAttachType::Egress)?)
    } else {
        (clsact(&name, "ingress")?, clsact(&name, "egress")?)
    };
    Ok(HookView { xdp: xdp.ids().into_iter().map(named).collect(), tc_ingress, tc_egress })
}

fn tcx(name: &str, attach: TcAttachType) -> Result<Vec<HookProg>> {
    let (_, progs) = SchedClassifier::query_tcx(name, attach).with_context(|| format!("cannot query tcx {attach:?} of {name}"))?;
    Ok(progs.iter().map(|p| HookProg { prog_id: p.id(), name: p.name_as_str().unwrap_or_default().to_owned() }).collect())
}

fn clsact(name: &str, direction: &str) -> Result<Vec<HookProg>> {
    let out = Command::new("tc").args(["-j", "filter", "show", "dev", name, direction]).output().context("cannot run tc (install iproute2)")?;
    if !out.status.success() {
        // No clsact qdisc: no filters.
        return Ok(Vec::new());
    }
    Ok(parse_tc_filters(&String::from_utf8_lossy(&out.stdout)))
}

/// `tc -j filter show`: the bpf filters' programs, by priority (the run order).
fn parse_tc_filters(json: &str) -> Vec<HookProg> {
    let doc: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let mut progs: Vec<(u64, HookProg)> = doc
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| {
            let prog = &f["options"]["prog"];
            let id = u32::try_from(prog["id"].as_u64()?).ok()?;
            Some((f["pref"].as_u64().unwrap_or(u64::MAX), HookProg { prog_id: id, name: prog["name"].as_str().unwrap_or_default().to_owned() }))
        })
        .collect();
    progs.sort_by_key(|(pref, _)| *pref);
    progs.into_iter().map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_filters_come_in_priority_order() {
        // iproute2 6.1 `tc -j filter show dev d0 ingress`, two cls_bpf filters.
        let json = r#"[{"protocol":"all","pref":5,"kind":"bpf","chain":0},{"protocol":"all","pref":5,"kind":"bpf","chain":0,"options":{"handle":"0x1","bpf_name":"x.o:[classifier]","direct-action":true,"prog":{"id":3748,"name":"other_tc","tag":"f0","jited":1}}},{"protocol":"all","pref":1,"kind":"bpf","chain":0},{"protocol":"all","pref":1,"kind":"bpf","chain":0,"options":{"handle":"0x1","prog":{"id":3744,"name":"natfix_guard_tc"}}}]"#;
        let progs = parse_tc_filters(json);
        assert_eq!(progs.iter().map(|p| p.prog_id).collect::<Vec<_>>(), vec![3744, 3748]);
        assert!(progs[0].is_natfix() && !progs[1].is_natfix());
        assert!(parse_tc_filters("not json").is_empty());
    }
}
