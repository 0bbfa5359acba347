//! Makes the node match the config: each entry attached (pinned, recorded
//! as the agent's), changed in place or replaced when the config changed,
//! attached again when its namespace was recreated; what the agent made and
//! the config no longer names, detached. Runs on the agent's own thread:
//! everything here blocks (namespaces, netlink, BPF loads).

use std::collections::BTreeSet;

use anyhow::Result;
use tracing::{info, warn};

use super::{
    config::{AgentConfig, AgentEntry},
    follow::Follower,
};
use crate::{
    config::{Delta, IfaceName, IfaceSel, Port, ResolvedFlowSource, SettingsChange},
    error::UserError,
    loader::{self, AttachPlan},
    observe::{metrics::Configured, state},
    pins::{self, PinDir},
    published::Published,
    record::{AttachmentMeta, Managed},
    sys::{iface, netns::Netns},
};

/// Where one entry stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Attached,
    /// Its namespace or interface does not exist (yet).
    Waiting(String),
    /// Attaching failed; tried again on the next pass.
    Failed(String),
}

/// One entry and what the agent holds for it.
struct Slot {
    entry: AgentEntry,
    status: Status,
    /// Where it is attached: (namespace inode, interface).
    at: Option<(u64, String)>,
    follower: Option<Follower>,
}

/// The agent's view of its entries.
pub struct Reconciler {
    config: AgentConfig,
    slots: Vec<Slot>,
    /// What Docker publishes (empty without Docker).
    docker: Published,
    /// A program was loaded since the heap was last trimmed.
    trim_due: bool,
}

impl Reconciler {
    #[must_use]
    pub fn new(config: AgentConfig) -> Self {
        let slots = config.entries.iter().cloned().map(|entry| Slot { entry, status: Status::Waiting("not tried yet".into()), at: None, follower: None }).collect();
        Self { config, slots, docker: Published::default(), trim_due: false }
    }

    /// Takes a new config: entries kept as they were keep their state.
    pub fn set_config(&mut self, config: AgentConfig) {
        let mut old = std::mem::take(&mut self.slots);
        self.slots = config
            .entries
            .iter()
            .cloned()
            .map(|entry| match old.iter().position(|s| s.entry.spec.iface == entry.spec.iface && s.entry.spec.netns == entry.spec.netns) {
                Some(i) => Slot { entry, ..old.swap_remove(i) },
                None => Slot { entry, status: Status::Waiting("new".into()), at: None, follower: None },
            })
            .collect();
        for gone in old {
            if let Some(f) = gone.follower {
                f.stop();
            }
        }
        self.config = config;
    }

    /// Whether the attachments stay when the agent stops.
    #[must_use]
    pub fn pins(&self) -> bool {
        self.config.pin
    }

    #[must_use]
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.config.metrics
    }

    pub fn set_docker(&mut self, published: Published) {
        self.docker = published;
    }

    /// One pass over every entry; `sync_published` also brings each guard's
    /// published ports up to date. Returns whether an entry still waits.
    pub fn pass(&mut self, sync_published: bool) -> bool {
        let records = match pins::attachments() {
            Ok(r) => r,
            Err(e) => {
                warn!("cannot read natfix's records: {e:#}");
                return true;
            }
        };
        for i in 0..self.slots.len() {
            let status = match self.ensure(i, &records, sync_published) {
                Ok(()) => Status::Attached,
                Err(e) => match e.downcast_ref::<UserError>() {
                    Some(UserError::NotFound(why)) => Status::Waiting(why.clone()),
                    _ => Status::Failed(format!("{e:#}")),
                },
            };
            self.note(i, status);
        }
        self.release_unconfigured();
        if std::mem::take(&mut self.trim_due) {
            // A load parses the kernel's BTF (megabytes): give the freed heap
            // back before idling. SAFETY: malloc_trim only releases free memory.
            unsafe { libc::malloc_trim(0) };
        }
        self.slots.iter().any(|s| s.status != Status::Attached)
    }

    /// Logs a change of an entry's status, once.
    fn note(&mut self, i: usize, status: Status) {
        let slot = &mut self.slots[i];
        if slot.status != status {
            let name = slot.entry.name();
            match &status {
                Status::Attached => {}
                Status::Waiting(why) => info!("{}: {name}: waiting: {why}", slot.entry.place),
                Status::Failed(why) => warn!("{}: {name}: {why}", slot.entry.place),
            }
        }
        if status != Status::Attached {
            slot.at = None;
            if let Some(f) = slot.follower.take() {
                f.stop();
            }
        }
        slot.status = status;
    }

    /// Attaches entry `i` where it is not, changes it where the config changed.
    fn ensure(&mut self, i: usize, records: &[(PinDir, AttachmentMeta)], sync_published: bool) -> Result<()> {
        let entry = self.slots[i].entry.clone();
        let netns = Netns::resolve(entry.spec.netns.as_deref())?;
        let iface = resolve_iface(&entry.spec.iface, &netns)?;
        let managed = managed_for(&self.config, &entry);
        let found = records.iter().find(|(_, m)| m.netns_inode == netns.inode && m.iface == iface.as_str());
        let in_place = found.filter(|(_, m)| m.managed.as_ref().is_some_and(|g| g.structure == managed.structure) && state::check(m).state.is_effective());
        let fresh = if let Some((dir, meta)) = in_place {
            // Settings changed, changed behind the agent's back (`natfix
            // set`), or the record is another config's (a moved file, an
            // agent that died): the config is put in force.
            let stale = meta.managed.as_ref().is_none_or(|g| g.settings != managed.settings || g.config != managed.config);
            if stale || drifted(meta, &entry) {
                let change = settings_change(meta, &entry);
                loader::live::change_managed(dir, &netns, change, &managed, &self.docker)?;
                info!("{}: {}: settings changed in place", entry.place, entry.name());
            }
            if sync_published && meta.guard.is_some() {
                loader::live::set_published(dir, &netns, &self.docker)?;
            }
            false
        } else {
            if let Some((_, m)) = found.filter(|(_, m)| m.managed.is_none() && m.pid.is_some_and(|_| !m.pinned && m.is_live())) {
                return Err(UserError::Conflict(format!("a foreground `natfix attach` (pid {}) holds {iface}: the agent leaves it", m.pid.unwrap_or(0))).into());
            }
            self.trim_due = true;
            self.attach(&entry, netns.clone(), &iface, managed)?;
            true
        };
        let slot = &mut self.slots[i];
        let at = (netns.inode, iface.to_string());
        if fresh || slot.at.as_ref() != Some(&at) || slot.follower.as_ref().is_some_and(Follower::finished) {
            if let Some(f) = slot.follower.take() {
                f.stop();
            }
            slot.follower = start_follower(&entry, &netns, &iface)?;
            slot.at = Some(at);
        }
        Ok(())
    }

    /// Attaches (or replaces what is there) pinned, recorded as the agent's.
    fn attach(&self, entry: &AgentEntry, netns: Netns, iface: &IfaceName, managed: Managed) -> Result<()> {
        let mut spec = entry.spec.clone();
        // The name found for `auto`: the record and a replace name the device.
        spec.iface = IfaceSel::Name(iface.clone());
        let mut plan = AttachPlan::new(&spec, netns, true, true)?;
        plan.docker_published = Some(self.docker.clone());
        plan.managed = Some(managed);
        let att = loader::attach(plan)?;
        info!("{}: {}: attached ({})", entry.place, entry.name(), att.pin_dir.path.display());
        Ok(())
    }

    /// Detaches what this agent made that no entry names now (an entry
    /// removed from the config, a namespace recreated, an interface renamed).
    fn release_unconfigured(&self) {
        let keep: BTreeSet<(u64, String)> = self.slots.iter().filter_map(|s| s.at.clone()).collect();
        let Ok(records) = pins::attachments() else { return };
        let config = self.config.path.display().to_string();
        for (dir, meta) in records {
            let ours = meta.managed.as_ref().is_some_and(|m| m.config == config);
            if !ours || keep.contains(&(meta.netns_inode, meta.iface.clone())) {
                continue;
            }
            // An entry still waiting for its (recreated) namespace owns nothing yet.
            if let Err(e) = release(&dir, &meta) {
                warn!("cannot detach the agent's former attachment on {} in namespace `{}`: {e:#}", meta.iface, meta.netns);
            }
        }
    }

    /// Detaches everything this agent made (it stops, and does not pin).
    pub fn detach_all(&mut self) {
        for slot in &mut self.slots {
            if let Some(f) = slot.follower.take() {
                f.stop();
            }
            slot.at = None;
        }
        self.release_unconfigured();
    }

    /// Stops the followers; the attachments stay (pinned).
    pub fn leave_attached(&mut self) {
        for slot in &mut self.slots {
            if let Some(f) = slot.follower.take() {
                f.stop();
            }
        }
    }

    /// Each entry as `/metrics` and `/healthz` report it.
    #[must_use]
    pub fn report(&self) -> Vec<(Configured, Status, String)> {
        self.slots
            .iter()
            .map(|s| {
                let c = Configured {
                    netns: s.entry.spec.netns_label().to_owned(),
                    iface: s.at.as_ref().map_or_else(|| s.entry.spec.iface.to_string(), |(_, i)| i.clone()),
                    attached: s.status == Status::Attached,
                };
                (c, s.status.clone(), s.entry.place.clone())
            })
            .collect()
    }
}

/// The interface `sel` names in `netns`; `NotFound` while it does not exist.
fn resolve_iface(sel: &IfaceSel, netns: &Netns) -> Result<IfaceName> {
    let sel = sel.clone();
    let label = netns.spec.clone();
    netns.run(move || match sel {
        IfaceSel::Name(name) => iface::index(&name, &label).map(|_| name),
        IfaceSel::DefaultRoute => iface::default_route()?
            .ok_or_else(|| UserError::NotFound(format!("namespace `{label}` has no IPv4 default route yet")).into()),
    })
}

/// What the record of `entry` says of the agent's wishes.
fn managed_for(config: &AgentConfig, entry: &AgentEntry) -> Managed {
    let s = &entry.spec;
    let structure = format!(
        "{:?}",
        (
            s.guard.as_ref().map(|g| (g.hook, g.xdp_mode, g.flow_source, g.filtering, g.flow_table_size, g.no_allow_published)),
            s.overlay.as_ref().map(|o| (o.csum, o.backend)),
        )
    );
    let settings = format!(
        "{:?}",
        (
            s.guard.as_ref().map(|g| (&g.ranges, &g.allow_ports, &g.allow_src, g.dry_run, g.flow_timeout)),
            s.overlay.as_ref().map(|o| (&o.vxlan_ports, o.reqid)),
            s.events_per_sec,
        )
    );
    Managed { config: config.path.display().to_string(), structure, settings }
}

/// The change that takes `meta`'s settings to `entry`'s.
fn settings_change(meta: &AttachmentMeta, entry: &AgentEntry) -> SettingsChange {
    let mut change = SettingsChange { events_per_sec: Some(entry.spec.events_per_sec), ..SettingsChange::default() };
    if let (Some(have), Some(want)) = (&meta.guard, &entry.spec.guard) {
        change.ranges = Some(want.ranges.clone());
        change.allow_ports = deltas(&have.allow_ports, &want.allow_ports).into_iter().map(|d| map_delta(d, Port)).collect();
        change.allow_src = deltas(&have.allow_src, &want.allow_src);
        change.dry_run = Some(want.dry_run);
        if have.flow_source == ResolvedFlowSource::Own {
            change.flow_timeout = Some(want.flow_timeout());
        }
        change.no_reap = want.no_reap;
    }
    if let Some(want) = &entry.spec.overlay {
        change.vxlan_ports = Some(want.vxlan_ports.clone());
        change.reqid = Some(want.reqid);
    }
    change
}

/// Whether the record's settings differ from what `entry` asks for.
fn drifted(meta: &AttachmentMeta, entry: &AgentEntry) -> bool {
    let same_set = |a: &[u16], b: &[u16]| a.iter().all(|x| b.contains(x)) && b.iter().all(|x| a.contains(x));
    let guard = match (&meta.guard, &entry.spec.guard) {
        (Some(have), Some(want)) => {
            have.ranges != want.range_texts()
                || !same_set(&have.allow_ports, &want.allow_ports)
                || !deltas(&have.allow_src, &want.allow_src).is_empty()
                || have.dry_run != want.dry_run
        }
        (None, None) => false,
        _ => true,
    };
    let overlay = match (&meta.overlay, &entry.spec.overlay) {
        (Some(have), Some(want)) => have.vxlan_auto != want.vxlan_auto() || (!want.vxlan_auto() && have.vxlan_ports != want.vxlan_ports) || have.reqid != want.reqid,
        (None, None) => false,
        _ => true,
    };
    guard || overlay || meta.events_per_sec.is_some_and(|e| e != entry.spec.events_per_sec)
}

fn deltas<T: Clone + PartialEq>(have: &[T], want: &[T]) -> Vec<Delta<T>> {
    let removed = have.iter().filter(|h| !want.contains(h)).cloned().map(Delta::Remove);
    let added = want.iter().filter(|w| !have.contains(w)).cloned().map(Delta::Add);
    removed.chain(added).collect()
}

fn map_delta<T, U>(d: Delta<T>, f: impl Fn(T) -> U) -> Delta<U> {
    match d {
        Delta::Add(x) => Delta::Add(f(x)),
        Delta::Remove(x) => Delta::Remove(f(x)),
    }
}

/// Removes an attachment the agent made: undone in its namespace, or, when
/// the namespace is gone, its pins released.
fn release(dir: &PinDir, meta: &AttachmentMeta) -> Result<()> {
    if let Ok(netns) = meta.find_netns() {
        loader::detach_recorded(dir, meta, &netns)?;
        info!("detached the agent's attachment on {} in namespace `{}`", meta.iface, meta.netns);
    } else {
        let _lock = pins::ChangeLock::acquire()?;
        dir.remove()?;
        info!("released the agent's attachment on {} in namespace `{}` (the namespace is gone)", meta.iface, meta.netns);
    }
    Ok(())
}

/// Conntrack sync (own flow table) and event logging for an attachment.
fn start_follower(entry: &AgentEntry, netns: &Netns, iface: &IfaceName) -> Result<Option<Follower>> {
    let dir = PinDir::new(netns.inode, iface);
    let meta = dir.read_meta()?;
    let own = meta.guard.as_ref().filter(|g| g.flow_source == ResolvedFlowSource::Own).map(|g| g.filtering == crate::config::Filtering::EndpointIndependent);
    if own.is_none() && !entry.log_events {
        return Ok(None);
    }
    Follower::start(dir, netns.clone(), own, entry.log_events).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_remove_what_went_and_add_what_came() {
        assert_eq!(deltas(&[1, 2, 3], &[2, 4]), vec![Delta::Remove(1), Delta::Remove(3), Delta::Add(4)]);
        assert!(deltas(&[5], &[5]).is_empty());
    }
}
