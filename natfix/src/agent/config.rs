//! The agent's config file (TOML): which attachments the node should have.
//! Keys are `natfix attach`'s long options; values go through the same
//! parsers and the same validation, and every error names the file, line
//! and column it is about.

use std::{
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, de::Error as _};
use toml::Spanned;

use crate::config::{
    AttachSpec, Cidr, CsumBackend, CsumMode, DEFAULT_EVENTS_PER_SEC, Filtering, FlowSource, GuardHook, GuardSpec, IfaceSel,
    OverlaySpec, PortRange, XdpMode, parse_port_range,
};

/// Where the agent reads its config unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/natfix/natfix.toml";

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct File {
    metrics: Option<Spanned<String>>,
    #[serde(default)]
    pin: bool,
    #[serde(default = "yes")]
    allow_published: bool,
    #[serde(default)]
    attach: Vec<Spanned<Entry>>,
}

fn yes() -> bool {
    true
}

/// One `[[attach]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Entry {
    #[serde(default, deserialize_with = "iface")]
    iface: Option<IfaceSel>,
    netns: Option<String>,
    #[serde(default, deserialize_with = "ranges")]
    guard: Vec<PortRange>,
    guard_hook: Option<GuardHook>,
    xdp_mode: Option<XdpMode>,
    flow_source: Option<FlowSource>,
    filtering: Option<Filtering>,
    #[serde(default, deserialize_with = "seconds")]
    flow_timeout: Option<Duration>,
    flow_table_size: Option<u32>,
    #[serde(default, deserialize_with = "one_or_many")]
    allow_port: Vec<u16>,
    #[serde(default, deserialize_with = "cidrs")]
    allow_src: Vec<Cidr>,
    #[serde(default)]
    dry_run: bool,
    reap: Option<bool>,
    allow_published: Option<bool>,
    #[serde(default)]
    overlay_fix: bool,
    #[serde(default, deserialize_with = "vxlan_ports")]
    vxlan_port: Option<Vec<u16>>,
    #[serde(default, deserialize_with = "reqid")]
    reqid: Option<u32>,
    csum: Option<CsumMode>,
    csum_backend: Option<CsumBackend>,
    events_rate: Option<u32>,
    #[serde(default)]
    log_events: bool,
}

/// The agent's settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub path: PathBuf,
    /// One `/metrics` and `/healthz` for every attachment on the host.
    pub metrics: Option<SocketAddr>,
    /// Keep the attachments when the agent stops (else they are detached).
    pub pin: bool,
    pub entries: Vec<AgentEntry>,
}

/// One attachment the node should have.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentEntry {
    /// `FILE:LINE` of its `[[attach]]` table, for messages.
    pub place: String,
    pub spec: AttachSpec,
    pub log_events: bool,
}

impl AgentEntry {
    /// `eth0 in ingress`, for messages.
    #[must_use]
    pub fn name(&self) -> String {
        format!("{} in {}", self.spec.iface, self.spec.netns_label())
    }
}

/// Reads and validates `path`: one line on error, naming where.
pub fn load(path: &Path) -> Result<AgentConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(path, &text)
}

/// Parses `text` as the config file `path`.
pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, String> {
    let at = |span: Option<Range<usize>>| match span {
        Some(s) => {
            let (line, col) = line_col(text, s.start);
            format!("{}:{line}:{col}", path.display())
        }
        None => path.display().to_string(),
    };
    let file: File = toml::from_str(text).map_err(|e| format!("{}: {}", at(e.span()), e.message().trim()))?;
    let metrics = match &file.metrics {
        Some(m) => Some(m.get_ref().parse().map_err(|_| format!("{}: metrics: `{}` is not an address:port", at(Some(m.span())), m.get_ref()))?),
        None => None,
    };
    let mut entries: Vec<AgentEntry> = Vec::new();
    for (i, entry) in file.attach.iter().enumerate() {
        let place = at(Some(entry.span()));
        let spec = entry.get_ref().spec(file.allow_published).map_err(|e| format!("{place}: [[attach]] #{}: {e}", i + 1))?;
        let new = AgentEntry { place, spec, log_events: entry.get_ref().log_events };
        if let Some(old) = entries.iter().find(|o| o.spec.iface == new.spec.iface && o.spec.netns_label() == new.spec.netns_label()) {
            return Err(format!("{}: [[attach]] #{}: {} is already attached by the entry at {}", new.place, i + 1, new.name(), old.place));
        }
        entries.push(new);
    }
    Ok(AgentConfig { path: path.to_owned(), metrics, pin: file.pin, entries })
}

/// 1-based line and column of byte `offset`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, col)
}

impl Entry {
    /// The attachment asked for; the messages are `attach`'s, with keys for flags.
    fn spec(&self, allow_published: bool) -> Result<AttachSpec, String> {
        let guard = (!self.guard.is_empty()).then(|| GuardSpec {
            ranges: self.guard.clone(),
            hook: self.guard_hook.unwrap_or_default(),
            xdp_mode: self.xdp_mode,
            flow_source: self.flow_source.unwrap_or_default(),
            filtering: self.filtering.unwrap_or_default(),
            flow_timeout: self.flow_timeout,
            flow_table_size: self.flow_table_size,
            allow_ports: self.allow_port.clone(),
            allow_src: self.allow_src.clone(),
            dry_run: self.dry_run,
            no_reap: !self.reap.unwrap_or(true),
            no_allow_published: !self.allow_published.unwrap_or(allow_published),
        });
        let guard_keys = self.guard_hook.is_some()
            || self.xdp_mode.is_some()
            || self.flow_source.is_some()
            || self.filtering.is_some()
            || self.flow_timeout.is_some()
            || self.flow_table_size.is_some()
            || !self.allow_port.is_empty()
            || !self.allow_src.is_empty()
            || self.dry_run
            || self.reap.is_some()
            || self.allow_published.is_some();
        if guard.is_none() && guard_keys {
            return Err("guard settings without `guard = [RANGE, ...]`".into());
        }
        let overlay_keys = self.vxlan_port.is_some() || self.reqid.is_some() || self.csum.is_some() || self.csum_backend.is_some();
        if !self.overlay_fix && overlay_keys {
            return Err("vxlan-port, reqid, csum and csum-backend need `overlay-fix = true`".into());
        }
        let overlay = self.overlay_fix.then(|| OverlaySpec {
            vxlan_ports: self.vxlan_port.clone().unwrap_or_default(),
            reqid: self.reqid,
            csum: self.csum.unwrap_or_default(),
            backend: self.csum_backend.unwrap_or_default(),
        });
        let spec = AttachSpec {
            iface: self.iface.clone().unwrap_or(IfaceSel::DefaultRoute),
            netns: self.netns.clone(),
            guard,
            overlay,
            events_per_sec: self.events_rate.unwrap_or(DEFAULT_EVENTS_PER_SEC),
        };
        spec.validate().map_err(|e| if e.starts_with("nothing to attach") { "nothing to attach: give `guard = [RANGE]` and/or `overlay-fix = true`".into() } else { e })?;
        Ok(spec)
    }
}

/// A number or a string, as TOML lets a port be written.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Num(i64),
    Text(String),
}

impl NumOrText {
    fn text(self) -> String {
        match self {
            Self::Num(n) => n.to_string(),
            Self::Text(t) => t,
        }
    }
}

/// `x` or `[x, ...]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            Self::One(x) => vec![x],
            Self::Many(v) => v,
        }
    }
}

fn iface<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IfaceSel>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(D::Error::custom)
}

fn ranges<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PortRange>, D::Error> {
    OneOrMany::<NumOrText>::deserialize(d)?.into_vec().into_iter().map(|r| parse_port_range(&r.text()).map_err(D::Error::custom)).collect()
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
    Ok(OneOrMany::<u16>::deserialize(d)?.into_vec())
}

fn cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Cidr>, D::Error> {
    OneOrMany::<String>::deserialize(d)?.into_vec().iter().map(|c| c.parse().map_err(D::Error::custom)).collect()
}

fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match u64::deserialize(d)? {
        0 => Err(D::Error::custom("flow-timeout must be a positive number of seconds")),
        n => Ok(Some(Duration::from_secs(n))),
    }
}

fn vxlan_ports<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u16>>, D::Error> {
    let all = OneOrMany::<NumOrText>::deserialize(d)?.into_vec();
    let mut ports = Vec::new();
    let mut auto = false;
    for p in all {
        match p.text().as_str() {
            "auto" => auto = true,
            t => match t.parse::<u16>() {
                Ok(n) if n > 0 => ports.push(n),
                _ => return Err(D::Error::custom(format!("`{t}` is neither a port (1-65535) nor `auto`"))),
            },
        }
    }
    if auto && !ports.is_empty() {
        return Err(D::Error::custom("vxlan-port `auto` cannot be combined with port numbers"));
    }
    Ok(Some(ports))
}

fn reqid<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let t = NumOrText::deserialize(d)?.text();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map(Some).map_err(|_| D::Error::custom(format!("`{t}` is not a number (decimal or 0x-hex)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<AgentConfig, String> {
        parse(Path::new("natfix.toml"), text)
    }

    #[test]
    fn the_documented_example_parses() {
        let c = parse_str(
            r#"
metrics = "127.0.0.1:9477"
[[attach]]
iface = "auto"
guard = ["20000-30000", 5000]
allow-port = 25500
[[attach]]
netns = "ingress"
iface = "eth0"
guard = "20000-30000"
flow-source = "own"
filtering = "endpoint-independent"
flow-timeout = 60
[[attach]]
iface = "eth1"
overlay-fix = true
vxlan-port = "auto"
reqid = "0xD0C4E3"
"#,
        )
        .unwrap();
        assert_eq!(c.metrics, Some("127.0.0.1:9477".parse().unwrap()));
        assert!(!c.pin);
        assert_eq!(c.entries.len(), 3);
        let g = c.entries[0].spec.guard.as_ref().unwrap();
        assert_eq!(g.ranges, vec![PortRange { first: 20000, last: 30000 }, PortRange { first: 5000, last: 5000 }]);
        assert_eq!((g.allow_ports.as_slice(), g.no_allow_published, g.no_reap), (&[25500][..], false, false));
        assert_eq!(c.entries[0].spec.iface, IfaceSel::DefaultRoute);
        let g = c.entries[1].spec.guard.as_ref().unwrap();
        assert_eq!((g.flow_source, g.filtering, g.flow_timeout), (FlowSource::Own, Filtering::EndpointIndependent, Some(Duration::from_mins(1))));
        let o = c.entries[2].spec.overlay.as_ref().unwrap();
        assert_eq!((o.vxlan_auto(), o.reqid), (true, Some(0x00D0_C4E3)));
        assert!(c.entries[1].place.starts_with("natfix.toml:"), "{}", c.entries[1].place);
    }

    #[test]
    fn errors_name_the_file_line_and_column() {
        for (text, want) in [
            ("[[attach]]\nguard = [\"20000-30000\"]\ngaurd-hook = \"tc\"\n", "natfix.toml:3:1: unknown field `gaurd-hook`"),
            ("[[attach]]\nguard = [\"30000-20000\"]\n", "natfix.toml:2:9: range `30000-20000` is reversed"),
            ("[[attach]]\nguard = \"20000-30000\"\nguard-hook = \"ebpf\"\n", "natfix.toml:3:14: unknown variant `ebpf`"),
            ("[[attach]]\nguard = 1000\nallow-port = 70000\n", "natfix.toml:3:14: "),
            ("[[attach]]\nguard = 1000\nallow-src = \"10.0.0.0/40\"\n", "prefix length"),
            ("[[attach]]\nguard = 1000\nallow-port = 2000\n", "natfix.toml:1:1: [[attach]] #1: --allow-port 2000 is outside every --guard range"),
            ("[[attach]]\niface = \"eth0\"\n", "nothing to attach: give `guard = [RANGE]` and/or `overlay-fix = true`"),
            ("[[attach]]\nvxlan-port = 4789\nguard = 1\n", "need `overlay-fix = true`"),
            ("[[attach]]\ndry-run = true\noverlay-fix = true\n", "guard settings without `guard = [RANGE, ...]`"),
            ("[[attach]]\niface = \"eth0/1\"\nguard = 1\n", "natfix.toml:2:9"),
            ("[[attach]]\nguard = 1\n[[attach]]\nguard = 2\n", "natfix.toml:3:1: [[attach]] #2: auto in self is already attached by the entry at natfix.toml:1:1"),
            ("metrics = \"localhost\"\n", "natfix.toml:1:11: metrics: `localhost` is not an address:port"),
            ("[[attach]]\nguard = 1\nflow-timeout = 0\n", "positive number of seconds"),
            ("[[attach]]\noverlay-fix = true\nvxlan-port = [\"auto\", 4789]\n", "cannot be combined"),
            ("[[attach]\n", "natfix.toml:1:"),
        ] {
            let err = parse_str(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn allow_published_is_global_with_a_per_entry_override() {
        let c = parse_str("allow-published = false\n[[attach]]\nguard = 1\n[[attach]]\niface = \"x\"\nguard = 1\nallow-published = true\n").unwrap();
        let g = |i: usize| c.entries[i].spec.guard.clone().unwrap();
        assert!(g(0).no_allow_published);
        assert!(!g(1).no_allow_published);
    }
}
