//! Loads natfix's eBPF objects, attaches them inside a namespace, upgrades
//! them in place, and undoes all of it: `plan` (spec -> what to load on this
//! kernel), `object` (load and configure objects), `attach` (attach with
//! rollback), `upgrade` (`--replace`), `teardown` (detach), and `kfunc`
//! (the pre-load fix-up that lets aya 0.14 call kfuncs).

mod attach;
pub mod live;
pub mod kfunc;
pub mod object;
pub mod plan;
mod teardown;
pub mod settings;
mod upgrade;

pub use attach::{Attachment, attach};
pub use plan::{AttachPlan, GuardPlan, OverlayPlan};
pub use teardown::{detach_recorded, detach_unrecorded};
