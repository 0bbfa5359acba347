//! What the operator asks natfix to do, validated: one description that the
//! command line and the agent's config file both turn into, and that the
//! loader takes. Nothing here knows clap, aya or the kernel.

mod change;
mod guard;
mod net;
mod overlay;
mod trace;

pub use change::*;
pub use guard::*;
pub use net::*;
pub use overlay::*;
pub use trace::*;

/// Default budget of sampled events per CPU per second (`--events-rate`).
pub const DEFAULT_EVENTS_PER_SEC: u32 = 20;

/// Which interface an attachment is on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IfaceSel {
    Name(IfaceName),
    /// The interface of the namespace's IPv4 default route, looked up at attach.
    DefaultRoute,
}

impl std::str::FromStr for IfaceSel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" { Ok(Self::DefaultRoute) } else { s.parse().map(Self::Name) }
    }
}

impl std::fmt::Display for IfaceSel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Name(n) => n.fmt(f),
            Self::DefaultRoute => f.write_str("auto"),
        }
    }
}

/// One attachment as asked for: where, and which fixes with which settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachSpec {
    pub iface: IfaceSel,
    /// `--netns` as the user wrote it; None: natfix's own namespace.
    pub netns: Option<String>,
    pub guard: Option<GuardSpec>,
    pub overlay: Option<OverlaySpec>,
    /// Sampled events per CPU per second (0: none).
    pub events_per_sec: u32,
}

impl AttachSpec {
    /// Checks every part; the error is the one line the user sees.
    pub fn validate(&self) -> Result<(), String> {
        if self.guard.is_none() && self.overlay.is_none() {
            return Err("nothing to attach: give --guard RANGE and/or --overlay-fix".into());
        }
        if let Some(g) = &self.guard {
            g.validate()?;
        }
        if let Some(o) = &self.overlay {
            o.validate()?;
        }
        Ok(())
    }

    /// The namespace as records name it: `self` when none was given.
    #[must_use]
    pub fn netns_label(&self) -> &str {
        self.netns.as_deref().unwrap_or("self")
    }
}
