//! The kernel's own view of what is attached, to check natfix's word against.

use anyhow::Result;
use aya::programs::{SchedClassifier, TcAttachType};

use crate::ScratchNs;

/// Program ids attached through tcx at `iface` in `ns` (kernel's view, `BPF_PROG_QUERY`).
pub fn tcx_prog_ids(ns: &ScratchNs, iface: &str, attach: TcAttachType) -> Result<Vec<u32>> {
    let iface = iface.to_owned();
    ns.run(move || {
        let (_, progs) = SchedClassifier::query_tcx(&iface, attach)?;
        Ok(progs.iter().map(aya::programs::ProgramInfo::id).collect())
    })
}

/// The XDP program id on `iface` in `ns` per `ip -j link` (kernel's view), if any.
pub fn xdp_prog_id(ns: &ScratchNs, iface: &str) -> Result<Option<u64>> {
    let out = ns.exec(&["ip", "-j", "-d", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v[0]["xdp"]["prog"]["id"].as_u64())
}

