//! Pre-load fix-up that lets aya 0.14 load C objects calling kernel kfuncs.
//! (filled in by the conntrack flow source)

use anyhow::Result;

pub fn relocate_kfuncs(object: &[u8]) -> Result<Vec<u8>> {
    anyhow::bail!(crate::error::UserError::Unsupported(format!(
        "kfunc relocation is not implemented yet ({} byte object)",
        object.len()
    )))
}
