//! A change of a running attachment's settings (`natfix set`, the agent's
//! reload): what to add, remove or replace, applied to the settings in
//! force to give the new ones, which are validated like an attach's.

use std::{fmt, str::FromStr, time::Duration};

use super::{
    guard::GuardSpec,
    net::{Cidr, PortRange},
    overlay::OverlaySpec,
};

/// `+X` (or `X`) adds, `-X` removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delta<T> {
    Add(T),
    Remove(T),
}

impl<T: FromStr<Err = String>> FromStr for Delta<T> {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix('-') {
            Some(rest) => rest.parse().map(Self::Remove),
            None => s.strip_prefix('+').unwrap_or(s).parse().map(Self::Add),
        }
    }
}

impl<T: fmt::Display> fmt::Display for Delta<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Add(x) => write!(f, "+{x}"),
            Self::Remove(x) => write!(f, "-{x}"),
        }
    }
}

/// A port, as `Delta<Port>` parses it (`+25000`, `-25000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Port(pub u16);

impl FromStr for Port {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("`{s}` is not a port (1-65535)")),
            Ok(p) => Ok(Self(p)),
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What to change; None/empty: keep.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SettingsChange {
    /// The guarded ranges, replaced whole.
    pub ranges: Option<Vec<PortRange>>,
    pub allow_ports: Vec<Delta<Port>>,
    pub allow_src: Vec<Delta<Cidr>>,
    pub dry_run: Option<bool>,
    pub flow_timeout: Option<Duration>,
    pub events_per_sec: Option<u32>,
    /// The overlay fix's VXLAN ports, replaced whole (empty: auto).
    pub vxlan_ports: Option<Vec<u16>>,
    /// Some(None): match every reqid again.
    pub reqid: Option<Option<u32>>,
    /// Keep the conntrack entries that unsolicited UDP made to ports the
    /// change guards (by default they are reaped, as at attach).
    pub no_reap: bool,
}

impl SettingsChange {
    #[must_use]
    pub fn touches_guard(&self) -> bool {
        self.ranges.is_some() || !self.allow_ports.is_empty() || !self.allow_src.is_empty() || self.dry_run.is_some() || self.flow_timeout.is_some()
    }

    #[must_use]
    pub fn touches_overlay(&self) -> bool {
        self.vxlan_ports.is_some() || self.reqid.is_some()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        !self.touches_guard() && !self.touches_overlay() && self.events_per_sec.is_none()
    }

    /// The guard's settings after the change; each delta must make sense
    /// (no removing what is not there), and the result must validate.
    pub fn apply_guard(&self, now: &GuardSpec) -> Result<GuardSpec, String> {
        let mut next = now.clone();
        if let Some(ranges) = &self.ranges {
            next.ranges.clone_from(ranges);
        }
        for d in &self.allow_ports {
            match *d {
                Delta::Add(Port(p)) if !next.allow_ports.contains(&p) => next.allow_ports.push(p),
                Delta::Add(_) => {}
                Delta::Remove(Port(p)) => {
                    let before = next.allow_ports.len();
                    next.allow_ports.retain(|x| *x != p);
                    if next.allow_ports.len() == before {
                        return Err(format!("--allow-port -{p}: {p} is not an exempt port"));
                    }
                }
            }
        }
        for d in &self.allow_src {
            match *d {
                Delta::Add(c) if !next.allow_src.contains(&c) => next.allow_src.push(c),
                Delta::Add(_) => {}
                Delta::Remove(c) => {
                    let before = next.allow_src.len();
                    next.allow_src.retain(|x| *x != c);
                    if next.allow_src.len() == before {
                        return Err(format!("--allow-src -{c}: {c} is not an allowed source"));
                    }
                }
            }
        }
        if let Some(dry) = self.dry_run {
            next.dry_run = dry;
        }
        if let Some(t) = self.flow_timeout {
            next.flow_timeout = Some(t);
        }
        next.allow_ports.sort_unstable();
        next.validate()?;
        Ok(next)
    }

    /// The overlay's settings after the change.
    pub fn apply_overlay(&self, now: &OverlaySpec) -> Result<OverlaySpec, String> {
        let mut next = now.clone();
        if let Some(ports) = &self.vxlan_ports {
            next.vxlan_ports.clone_from(ports);
        }
        if let Some(reqid) = self.reqid {
            next.reqid = reqid;
        }
        next.validate()?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> GuardSpec {
        GuardSpec {
            ranges: vec![PortRange { first: 20000, last: 30000 }],
            allow_ports: vec![25000],
            allow_src: vec!["10.0.0.0/8".parse().unwrap()],
            ..GuardSpec::default()
        }
    }

    #[test]
    fn deltas_parse() {
        assert_eq!("+25000".parse::<Delta<Port>>(), Ok(Delta::Add(Port(25000))));
        assert_eq!("25000".parse::<Delta<Port>>(), Ok(Delta::Add(Port(25000))));
        assert_eq!("-25000".parse::<Delta<Port>>(), Ok(Delta::Remove(Port(25000))));
        assert!("-0".parse::<Delta<Port>>().is_err());
        assert_eq!("-10.0.0.0/8".parse::<Delta<Cidr>>(), Ok(Delta::Remove("10.0.0.0/8".parse().unwrap())));
        assert!("+banana".parse::<Delta<Cidr>>().is_err());
    }

    #[test]
    fn changes_apply_and_refuse_what_makes_no_sense() {
        let c = SettingsChange { allow_ports: vec![Delta::Add(Port(26000)), Delta::Remove(Port(25000))], dry_run: Some(true), ..Default::default() };
        let next = c.apply_guard(&guard()).unwrap();
        assert_eq!((next.allow_ports, next.dry_run), (vec![26000], true));
        let bad = [
            (SettingsChange { allow_ports: vec![Delta::Remove(Port(27000))], ..Default::default() }, "is not an exempt port"),
            (SettingsChange { allow_ports: vec![Delta::Add(Port(40000))], ..Default::default() }, "outside every --guard range"),
            (SettingsChange { allow_src: vec![Delta::Remove("192.0.2.0/24".parse().unwrap())], ..Default::default() }, "is not an allowed source"),
            // Narrowing the ranges leaves the exemption outside.
            (SettingsChange { ranges: Some(vec![PortRange { first: 20000, last: 21000 }]), ..Default::default() }, "outside every --guard range"),
        ];
        for (c, says) in bad {
            assert!(c.apply_guard(&guard()).unwrap_err().contains(says), "{c:?}");
        }
        let o = SettingsChange { vxlan_ports: Some(vec![4777]), reqid: Some(None), ..Default::default() };
        let next = o.apply_overlay(&OverlaySpec { reqid: Some(1), ..OverlaySpec::default() }).unwrap();
        assert_eq!((next.vxlan_ports, next.reqid), (vec![4777], None));
    }
}
