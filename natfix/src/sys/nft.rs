//! Runs `nft` (nftables' own CLI, JSON in and out) in the calling thread's
//! network namespace. natfix writes rulesets as JSON so that names and
//! numbers stay data, never syntax.

use std::{io::Write as _, process::Command};

use anyhow::{Context, Result, bail};

/// Applies a JSON ruleset (`nft -j -f`) as one transaction.
pub fn apply_json(doc: &serde_json::Value) -> Result<()> {
    let mut child = Command::new("nft")
        // /proc/self/fd/0, not `-` (/dev/stdin): minimal /dev trees (containers, initramfs) lack it.
        .args(["-j", "-f", "/proc/self/fd/0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run nft (install nftables)")?;
    child.stdin.take().context("nft stdin")?.write_all(doc.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft rejected natfix's ruleset: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `nft -j list table FAMILY TABLE`; Err names why (missing table included).
pub fn list_table(family: &str, table: &str) -> Result<String> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", family, table])
        .output()
        .context("cannot run nft (install nftables)")?;
    if !out.status.success() {
        bail!("cannot read nftables table {family} {table}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nft delete table FAMILY TABLE`.
pub fn delete_table(family: &str, table: &str) -> Result<()> {
    let out = Command::new("nft")
        .args(["delete", "table", family, table])
        .output()
        .context("cannot run nft (install nftables)")?;
    if !out.status.success() {
        bail!("cannot delete nftables table {family} {table}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The names of the tables of `family` (`nft -j list tables FAMILY`).
pub fn table_names(family: &str) -> Result<Vec<String>> {
    let out = Command::new("nft")
        .args(["-j", "list", "tables", family])
        .output()
        .context("cannot run nft (install nftables)")?;
    if !out.status.success() {
        bail!("cannot list nftables tables: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).context("`nft -j list tables` printed invalid JSON")?;
    Ok(doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item["table"]["name"].as_str().map(str::to_owned))
        .collect())
}
