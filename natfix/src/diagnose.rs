//! `natfix diagnose`: inspects a live host for the problems natfix fixes.

use anyhow::Result;

use crate::cli::DiagnoseArgs;

pub fn run(_args: &DiagnoseArgs) -> Result<()> {
    anyhow::bail!("diagnose is being written")
}
