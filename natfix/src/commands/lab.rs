//! `natfix lab`: the seed problems reproduced and fixed in throwaway namespaces.

use anyhow::{Result, bail};

use crate::{error::UserError, lab, pins, sys::features};

pub fn run(guard: bool, overlay: bool) -> Result<()> {
    features::require_privileges(true)?;
    pins::require_bpffs()?;
    let mut ok = true;
    let mut skipped = false;
    if guard {
        ok &= lab::run_guard_lab()?;
    }
    if overlay {
        match lab::run_overlay_lab()? {
            Some(fixed) => ok &= fixed,
            None => skipped = true,
        }
    }
    if !ok {
        bail!("the lab did not show every problem fixed (see above)");
    }
    if skipped {
        bail!(UserError::Unsupported(
            "the overlay scenario needs ESP, which this kernel lacks: run `cargo xtask vm --scenario esp-nat --mode baseline,natfix-auto`".into()
        ));
    }
    println!("lab: every problem reproduced and fixed");
    Ok(())
}
