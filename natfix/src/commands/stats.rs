//! `natfix stats`: the counters of attachments, once or every few seconds.

use std::time::Duration;

use anyhow::{Result, bail};

use crate::{config::IfaceName, error::UserError, observe::stats, pins, sys::netns::Netns};

pub fn run(iface: Option<&IfaceName>, netns: Option<&str>, json: bool, watch: Option<Duration>) -> Result<()> {
    pins::require_bpffs()?;
    let netns_inode = netns.map(|spec| Netns::resolve(Some(spec)).map(|ns| ns.inode)).transpose()?;
    let mut previous: Option<(Vec<stats::AttachmentStats>, std::time::Instant)> = None;
    loop {
        let all = stats::collect(iface, netns_inode)?;
        let taken = std::time::Instant::now();
        if all.is_empty() && (iface.is_some() || netns_inode.is_some()) {
            bail!(UserError::NotFound("no natfix attachment matches (see `natfix status`)".into()));
        }
        let rates = previous.as_ref().map(|(before, at)| stats::rates(before, &all, taken.duration_since(*at)));
        if json {
            println!("{}", serde_json::to_string(&serde_json::json!({ "attachments": all }))?);
        } else {
            print!("{}", stats::render_table(&all, rates.as_ref()));
        }
        let Some(every) = watch else { return Ok(()) };
        previous = Some((all, taken));
        std::thread::sleep(every);
    }
}
