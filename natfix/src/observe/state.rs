//! An attachment's state as the kernel has it, not as its record remembers:
//! is its namespace there, its owner alive, its interface present (and
//! under which name), is each program still attached where the record says
//! (by its `bpf_link`, or on the hook), does another program run before it on
//! the same hook, and are there natfix programs on the interface that no
//! record accounts for.

use serde::Serialize;

use crate::{
    overlay,
    record::{AttachmentMeta, Hook},
    sys::{
        bpf,
        hooks::{self, HookProg, HookView},
        iface, nft,
    },
};

/// What `status` reports for an attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// A foreground `natfix attach` owns it, and everything is attached.
    Running,
    /// Pinned, and everything is attached.
    Pinned,
    /// Attached, but another program runs before natfix's on one of its hooks
    /// (and may decide packets natfix never sees).
    Shadowed,
    /// Its interface is gone (a device of the same name may have come back).
    InterfaceGone,
    /// Some of what the record says is no longer attached.
    Detached,
    /// Its namespace or its owning process is gone.
    Stale,
}

impl State {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Pinned => "pinned",
            Self::Shadowed => "shadowed",
            Self::InterfaceGone => "interface-gone",
            Self::Detached => "detached",
            Self::Stale => "stale",
        }
    }

    /// Whether the attachment still protects what it was made for.
    #[must_use]
    pub const fn is_effective(self) -> bool {
        matches!(self, Self::Running | Self::Pinned | Self::Shadowed)
    }
}

/// One recorded program, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProgramState {
    pub attached: bool,
    /// Programs of others that run before it on its hook.
    pub runs_after: Vec<HookProg>,
}

/// An attachment, checked against the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttachmentState {
    pub state: State,
    /// Why the state is what it is, one line each.
    pub problems: Vec<String>,
    /// The interface's name now, when it was renamed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iface_now: Option<String>,
    /// Parallel to the record's programs.
    #[serde(skip)]
    pub programs: Vec<ProgramState>,
    /// natfix programs on the interface's hooks that the record does not have.
    pub unrecorded_programs: Vec<HookProg>,
}

impl AttachmentState {
    fn new(state: State, problem: Option<String>) -> Self {
        Self { state, problems: problem.into_iter().collect(), iface_now: None, programs: Vec::new(), unrecorded_programs: Vec::new() }
    }
}

/// Checks `meta` against the kernel (entering its namespace).
#[must_use]
pub fn check(meta: &AttachmentMeta) -> AttachmentState {
    let ns = match meta.find_netns() {
        Ok(ns) => ns,
        Err(e) => return AttachmentState::new(State::Stale, Some(format!("{e:#}"))),
    };
    if !meta.pinned && !meta.is_live() {
        let owner = meta.pid.map_or_else(String::new, |p| format!(" (pid {p})"));
        return AttachmentState::new(State::Stale, Some(format!("the natfix attach that owned it{owner} is gone")));
    }
    let meta = meta.clone();
    ns.run(move || Ok(check_here(&meta)))
        .unwrap_or_else(|e| AttachmentState::new(State::Stale, Some(format!("cannot enter its namespace: {e:#}"))))
}

/// `check` inside the attachment's namespace.
#[must_use]
pub fn check_here(meta: &AttachmentMeta) -> AttachmentState {
    let default = if meta.pinned { State::Pinned } else { State::Running };
    let Some(name_now) = iface::name_of(meta.ifindex) else {
        let mut s = AttachmentState::new(State::InterfaceGone, Some(format!("no interface has index {} any more", meta.ifindex)));
        s.programs = vec![ProgramState::default(); meta.programs.len()];
        return s;
    };
    let view = match hooks::view(meta.ifindex) {
        Ok(v) => v,
        Err(e) => return AttachmentState::new(State::Detached, Some(format!("cannot read the interface's hooks: {e:#}"))),
    };
    let mut s = AttachmentState::new(default, None);
    if name_now != meta.iface {
        s.iface_now = Some(name_now.clone());
        s.problems.push(format!("the interface was renamed from {} to {name_now}", meta.iface));
    }
    let ours: Vec<u32> = meta.programs.iter().map(|p| p.prog_id).collect();
    for p in &meta.programs {
        let on_hook = hook_list(&view, p.hook);
        let attached = match p.link_id {
            Some(link) => bpf::link_facts_by_id(link).is_ok_and(|l| l.ifindex == meta.ifindex && l.prog_id == p.prog_id),
            None => on_hook.iter().any(|h| h.prog_id == p.prog_id),
        };
        let position = on_hook.iter().position(|h| h.prog_id == p.prog_id).unwrap_or(0);
        let runs_after: Vec<HookProg> = on_hook[..position].iter().filter(|h| !ours.contains(&h.prog_id)).cloned().collect();
        if !attached {
            s.problems.push(format!("{} (prog id {}) is not attached to {} {}", p.name, p.prog_id, name_now, p.hook.name()));
        }
        for other in &runs_after {
            s.problems.push(format!("{} (prog id {}) runs before {} on {} {}", other.name, other.prog_id, p.name, name_now, p.hook.name()));
        }
        s.programs.push(ProgramState { attached, runs_after });
    }
    s.unrecorded_programs = view.natfix_progs().filter(|h| !ours.contains(&h.prog_id)).cloned().collect();
    for h in &s.unrecorded_programs {
        s.problems.push(format!("natfix program {} (prog id {}) on {name_now} is not in this record (another natfix, with its own bpffs?)", h.name, h.prog_id));
    }
    if let Some(table) = meta.overlay.as_ref().and_then(|o| o.changes.nft_table.as_ref())
        && !nft::table_names("ip").is_ok_and(|t| t.contains(table))
    {
        s.problems.push(format!("nftables table ip {table} is gone"));
        s.state = State::Detached;
    }
    if s.programs.iter().any(|p| !p.attached) {
        s.state = State::Detached;
    } else if s.state == default && s.programs.iter().any(|p| !p.runs_after.is_empty()) {
        s.state = State::Shadowed;
    }
    s
}

fn hook_list(view: &HookView, hook: Hook) -> &[HookProg] {
    match hook {
        Hook::Xdp => &view.xdp,
        Hook::TcIngress => &view.tc_ingress,
        Hook::TcEgress => &view.tc_egress,
    }
}

/// Whether an nft table of the overlay fix is in the calling thread's namespace.
#[must_use]
pub fn overlay_table_present(ifindex: u32) -> bool {
    nft::table_names("ip").is_ok_and(|t| t.contains(&overlay::nft::table_name(ifindex)))
}
