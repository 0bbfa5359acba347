//! `natfix monitor`: streams the sampled events of matching attachments.

use anyhow::{Result, bail};

use crate::{
    config::IfaceName,
    error::UserError,
    observe::events::spawn_readers,
    pins::{self, PinDir},
    sys::{features, netns::Netns},
};

pub fn run(iface: Option<&IfaceName>, netns: Option<&str>, json: bool, count: Option<u64>) -> Result<()> {
    features::require_privileges(false)?;
    pins::require_bpffs()?;
    let netns_inode = netns.map(|spec| Netns::resolve(Some(spec)).map(|ns| ns.inode)).transpose()?;
    let dirs: Vec<PinDir> = pins::attachments()?
        .into_iter()
        .filter(|(_, m)| iface.is_none_or(|i| i.as_str() == m.iface) && netns_inode.is_none_or(|n| n == m.netns_inode))
        .map(|(d, _)| d)
        .collect();
    if dirs.is_empty() {
        bail!(UserError::NotFound("no natfix attachment matches (see `natfix status`)".into()));
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut rx = spawn_readers(&dirs)?;
        let mut seen = 0u64;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            let batch = tokio::select! {
                b = rx.recv() => b,
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = term.recv() => return Ok(()),
            };
            let Some(batch) = batch else { return Ok(()) };
            for record in batch? {
                if json {
                    println!("{}", serde_json::to_string(&record)?);
                } else {
                    println!("{record}");
                }
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    return Ok(());
                }
            }
        }
    })
}
