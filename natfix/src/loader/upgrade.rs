//! `attach --pin --replace`: swaps the programs of a pinned attachment
//! atomically (`bpf_link_update`: no packet sees no program) and keeps its
//! maps, so counters and learned flows survive the upgrade.

use anyhow::{Context, Result, bail};
use aya::programs::{
    SchedClassifier, Xdp,
    links::{FdLink, PinnedLink},
};
use natfix_ebpf::maps as map_names;
use tracing::info;

use super::{
    attach::{Attachment, new_record},
    object::{self, load_program},
    plan::AttachPlan,
};
use crate::{
    config::IfaceName,
    error::UserError,
    overlay,
    pins::{self, PinDir},
    record::{AttachMode, AttachmentMeta, Hook, ProgramMeta},
};

pub(super) fn upgrade_here(plan: &AttachPlan, iface: IfaceName, pin_dir: &PinDir, old: &AttachmentMeta, ifindex: u32) -> Result<Attachment> {
    let planned = plan.programs();
    let mut want: Vec<_> = planned.iter().map(|(p, h)| (p.c_name(), h.name())).collect();
    let mut have: Vec<_> = old.programs.iter().map(|p| (p.name.c_name(), p.hook.name())).collect();
    want.sort_unstable();
    have.sort_unstable();
    if want != have {
        bail!(UserError::Conflict(format!(
            "--replace keeps the same programs on the same hooks (attached: {have:?}, requested: {want:?}); detach and attach instead"
        )));
    }
    if old.programs.iter().any(|p| p.mode == AttachMode::Clsact) {
        bail!(UserError::Unsupported("--replace needs bpf_links (tcx, Linux >= 6.6); this attachment uses clsact filters".into()));
    }
    let meta = new_record(plan, &iface, ifindex, old.netns_cookie, Some(old));
    let mut att = Attachment::load(plan, iface, pin_dir.clone(), meta, Some(pin_dir))?;
    if let Some(object) = att.overlay.as_mut() {
        object::install_overlay_writer(object)?;
    }
    for (program, hook) in planned {
        let was = old.programs.iter().find(|p| p.name == program);
        let (mode, link_id) = was.map_or((AttachMode::Tcx, None), |p| (p.mode, p.link_id));
        let path = att.pin_dir.link(program);
        let link = FdLink::from(PinnedLink::from_pin(&path).with_context(|| format!("cannot open {}", path.display()))?);
        let object = att.object(program)?;
        let prog_id = if hook == Hook::Xdp {
            let prog = load_program::<Xdp>(object, program.c_name())?;
            let id = prog.attach_to_link(link.try_into().context("pinned XDP link")?).with_context(|| format!("cannot swap {program}"))?;
            // The pin keeps the link; our handle may go.
            drop(prog.take_link(id)?);
            prog.info()?.id()
        } else {
            let prog = load_program::<SchedClassifier>(object, program.c_name())?;
            let id = prog.attach_to_link(link.try_into().context("pinned tcx link")?).with_context(|| format!("cannot swap {program}"))?;
            drop(prog.take_link(id)?);
            prog.info()?.id()
        };
        // bpf_link_update keeps the link: its id stays.
        att.meta.programs.push(ProgramMeta { name: program, hook, mode, prog_id, link_id });
    }
    // Maps an older natfix did not have (the live settings) are pinned now.
    super::attach::pin_object_maps(att.guard.as_ref(), &object::GUARD_PINNED_MAPS, &att.pin_dir, true)?;
    super::attach::pin_object_maps(att.overlay.as_ref(), &object::OVERLAY_PINNED_MAPS, &att.pin_dir, true)?;
    if let Some(map) = att.overlay.as_ref().and_then(|o| o.map(map_names::OVERLAY_WRITER)) {
        // The old array went with the old program; pin the new one in its place.
        let path = att.pin_dir.map(pins::OVERLAY_WRITER);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("cannot unpin {}", path.display()))?;
        }
        map.pin(&path).with_context(|| format!("cannot pin {}", path.display()))?;
    }
    if let Some(o) = plan.overlay.as_ref().filter(|o| o.backend.uses_nft()) {
        let ifindex = att.meta.ifindex;
        let iface = att.iface.clone();
        if let Some(m) = att.meta.overlay.as_mut() {
            overlay::nft::install(ifindex, iface.as_str(), &o.ports, o.reqid, &mut m.changes)?;
        }
    }
    att.pin_dir.write_meta(&att.meta)?;
    let swapped: Vec<String> = att.meta.programs.iter().map(|p| format!("{} (prog id {})", p.name, p.prog_id)).collect();
    info!(iface = %att.iface, netns = %att.netns.spec, "upgraded in place: {}", swapped.join(", "));
    Ok(att)
}
