//! `natfix stats`: the counters of attachments, once or every few seconds.

use std::time::Duration;

use anyhow::{Result, bail};

use crate::{config::IfaceName, error::UserError, observe::stats, pins, sys::netns::Netns};

pub fn run(iface: Option<&IfaceName>, netns: Option<&str>, json: bool, watch: Option<Duration>) -> Result<()> {
    pins::require_bpffs()?;
    let netns_inode = netns.map(|spec| Netns::resolve(Some(spec)).map(|ns| ns.inode)).transpose()?;
    loop {
        let all = stats::collect(iface, netns_inode)?;
        if all.is_empty() && (iface.is_some() || netns_inode.is_some()) {
            bail!(UserError::NotFound("no natfix attachment matches (see `natfix status`)".into()));
        }
        if json {
            println!("{}", serde_json::to_string(&serde_json::json!({ "attachments": all }))?);
        } else {
            print!("{}", stats::render_table(&all));
        }
        let Some(every) = watch else { return Ok(()) };
        std::thread::sleep(every);
    }
}
