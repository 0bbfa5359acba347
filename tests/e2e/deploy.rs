//! The deploy files (deploy/) in step with each other and with natfix: the
//! Compose file, the swarm stack, the `DaemonSet` and the systemd unit grant
//! the same capabilities and mount the same host paths (apart from the
//! differences each file explains), run the same agent command, and the
//! example configuration is one `natfix attach` accepts. Runs without root.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use clap::Parser as _;
use yaml_serde::Value;

/// What natfix needs (README.md, "Deploy", says why each).
const CAPABILITIES: [&str; 3] = ["NET_ADMIN", "SYS_ADMIN", "SYS_MODULE"];

const AGENT: [&str; 3] = ["agent", "--config", "/etc/natfix/natfix.toml"];

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file)
}

fn read(file: &str) -> String {
    std::fs::read_to_string(deploy(file)).unwrap_or_else(|e| panic!("deploy/{file}: {e}"))
}

fn yaml(file: &str) -> Value {
    yaml_serde::from_str(&read(file)).unwrap_or_else(|e| panic!("deploy/{file} is not YAML: {e}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().unwrap_or_else(|| panic!("not a list: {v:?}")).iter().map(|s| s.as_str().expect("a string").to_owned()).collect()
}

fn set(items: impl IntoIterator<Item = impl Into<String>>) -> BTreeSet<String> {
    items.into_iter().map(Into::into).collect()
}

/// A host path (or the configuration) as a container sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Mount {
    target: String,
    /// The host path; `config` for the natfix.toml the orchestrator provides.
    source: String,
    read_only: bool,
    /// Mounts made on the host later show up inside (rslave, `HostToContainer`).
    from_host: bool,
}

fn mount(source: &str, target: &str, read_only: bool, from_host: bool) -> Mount {
    Mount { target: target.into(), source: source.into(), read_only, from_host }
}

/// Compose's and the stack's short syntax, `SRC:DST[:ro,rslave]`.
fn short_mount(spec: &str) -> Mount {
    let mut parts = spec.splitn(3, ':');
    let (source, target) = (parts.next().unwrap(), parts.next().unwrap_or_else(|| panic!("no target: {spec}")));
    let opts: Vec<&str> = parts.next().map(|o| o.split(',').collect()).unwrap_or_default();
    let source = if source.ends_with("natfix.toml") { "config" } else { source };
    mount(source, target, opts.contains(&"ro"), opts.iter().any(|o| o.ends_with("slave")))
}

fn docker_mounts(file: &str) -> BTreeSet<Mount> {
    let doc = yaml(file);
    let service = &doc["services"]["natfix"];
    let mut mounts: BTreeSet<Mount> = strings(&service["volumes"]).iter().map(|v| short_mount(v)).collect();
    for config in service["configs"].as_sequence().into_iter().flatten() {
        mounts.insert(mount("config", config["target"].as_str().expect("config target"), true, false));
    }
    mounts
}

fn daemonset_mounts() -> BTreeSet<Mount> {
    let doc = yaml("daemonset.yaml");
    let pod = &doc["spec"]["template"]["spec"];
    let volumes: BTreeMap<&str, &Value> = pod["volumes"].as_sequence().unwrap().iter().map(|v| (v["name"].as_str().unwrap(), v)).collect();
    pod["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| {
            let volume = volumes[m["name"].as_str().unwrap()];
            let read_only = m["readOnly"].as_bool().unwrap_or(false);
            let from_host = matches!(m["mountPropagation"].as_str(), Some("HostToContainer" | "Bidirectional"));
            let target = m["mountPath"].as_str().unwrap();
            if volume["configMap"].is_mapping() {
                // The ConfigMap's key natfix.toml (README: --from-file=natfix.toml=...).
                mount("config", &format!("{target}/natfix.toml"), read_only, from_host)
            } else {
                mount(volume["hostPath"]["path"].as_str().unwrap(), target, read_only, from_host)
            }
        })
        .collect()
}

#[test]
fn every_deployment_grants_the_same_capabilities() {
    let expected = set(CAPABILITIES);
    assert_eq!(set(strings(&yaml("compose.yml")["services"]["natfix"]["cap_add"])), expected, "compose.yml");
    assert_eq!(set(strings(&yaml("swarm-stack.yml")["services"]["natfix"]["cap_add"])), expected, "swarm-stack.yml");
    let container = &yaml("daemonset.yaml")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(set(strings(&container["securityContext"]["capabilities"]["add"])), expected, "daemonset.yaml");
    assert!(container["securityContext"]["privileged"].as_bool() != Some(true), "daemonset.yaml: not privileged");
    let unit = read("natfix.service");
    let bounding = unit.lines().find_map(|l| l.strip_prefix("CapabilityBoundingSet=")).expect("natfix.service: CapabilityBoundingSet=");
    assert_eq!(set(bounding.split_whitespace().map(|c| c.trim_start_matches("CAP_"))), expected, "natfix.service");
    // The README says why each is needed.
    let readme = std::fs::read_to_string(deploy("../README.md")).unwrap();
    let section = readme.split("\n## Deploy").nth(1).expect("README.md has a Deploy section");
    for cap in CAPABILITIES {
        assert!(section.contains(&format!("CAP_{cap}")), "README.md, Deploy: no word on CAP_{cap}");
    }
}

#[test]
fn every_deployment_mounts_the_same_host_paths() {
    let bpffs = mount("/sys/fs/bpf", "/sys/fs/bpf", false, false);
    let docker_netns = mount("/var/run/docker/netns", "/var/run/docker/netns", true, true);
    let run_netns = mount("/run/netns", "/run/netns", true, true);
    let modules = mount("/lib/modules", "/lib/modules", true, false);
    let docker_sock = mount("/var/run/docker.sock", "/var/run/docker.sock", true, false);
    let config = mount("config", "/etc/natfix/natfix.toml", true, false);
    // Each file's comments say why it leaves out what it does: the stack has
    // no /run/netns (swarm binds need the source on every node), the
    // DaemonSet no docker.sock (Kubernetes nodes run containerd).
    let common = [bpffs, docker_netns, modules, config];
    let with = |extra: &[Mount]| -> BTreeSet<Mount> { common.iter().chain(extra).cloned().collect() };
    assert_eq!(docker_mounts("compose.yml"), with(&[run_netns.clone(), docker_sock.clone()]), "compose.yml");
    assert_eq!(docker_mounts("swarm-stack.yml"), with(&[docker_sock]), "swarm-stack.yml");
    assert_eq!(daemonset_mounts(), with(&[run_netns]), "daemonset.yaml");
}

#[test]
fn every_deployment_runs_the_agent_on_the_hosts_namespaces() {
    let agent = AGENT.map(str::to_owned).to_vec();
    let compose = yaml("compose.yml");
    let service = &compose["services"]["natfix"];
    assert_eq!(strings(&service["command"]), agent, "compose.yml");
    assert_eq!(service["network_mode"].as_str(), Some("host"), "compose.yml");
    assert_eq!(service["pid"].as_str(), Some("host"), "compose.yml: one pid namespace for natfix's records");

    let stack = yaml("swarm-stack.yml");
    let service = &stack["services"]["natfix"];
    assert_eq!(strings(&service["command"]), agent, "swarm-stack.yml");
    assert_eq!(service["deploy"]["mode"].as_str(), Some("global"), "swarm-stack.yml: one agent per node");
    let network = strings(&service["networks"]).pop().expect("swarm-stack.yml: a network");
    assert_eq!(stack["networks"][network.as_str()]["name"].as_str(), Some("host"), "swarm-stack.yml: the host network");
    assert!(stack["networks"][network.as_str()]["external"].as_bool() == Some(true));
    // No pid: host in swarm, so its configuration pins (see swarm_config_*).
    assert!(service["pid"].is_null(), "swarm-stack.yml: swarm ignores pid");
    let config = service["configs"][0]["source"].as_str().unwrap();
    assert_eq!(stack["configs"][config]["file"].as_str(), Some("./natfix-swarm.toml"));

    let daemonset = yaml("daemonset.yaml");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(strings(&pod["containers"][0]["args"]), agent, "daemonset.yaml");
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true), "daemonset.yaml");
    assert_eq!(pod["hostPID"].as_bool(), Some(true), "daemonset.yaml");

    let unit = read("natfix.service");
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart=");
    assert_eq!(exec.split_whitespace().skip(1).collect::<Vec<_>>(), AGENT, "natfix.service");
    assert!(unit.lines().any(|l| l == "Type=simple") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID"), "natfix.service");

    let dockerfile = read("Dockerfile");
    assert!(dockerfile.lines().any(|l| l == "FROM debian:bookworm-slim"), "Dockerfile: FROM");
    assert!(dockerfile.lines().any(|l| l == r#"ENTRYPOINT ["natfix"]"#), "Dockerfile: ENTRYPOINT");
    let cmd = format!("CMD [{}]", AGENT.map(|a| format!("\"{a}\"")).join(", "));
    assert!(dockerfile.lines().any(|l| l == cmd), "Dockerfile: {cmd}");
    let health = |l: &str| l.starts_with("HEALTHCHECK ") && l.ends_with(r#"CMD ["natfix", "health"]"#);
    assert!(dockerfile.lines().any(health), "Dockerfile: HEALTHCHECK");
}

fn toml_file(file: &str) -> toml::Table {
    read(file).parse().unwrap_or_else(|e| panic!("deploy/{file} is not TOML: {e}"))
}

#[test]
fn swarm_config_is_the_example_with_pin() {
    let mut example = toml_file("natfix.toml");
    let mut swarm = toml_file("natfix-swarm.toml");
    assert_eq!(example.remove("pin").and_then(|v| v.as_bool()), Some(false));
    assert_eq!(swarm.remove("pin").and_then(|v| v.as_bool()), Some(true), "a service without pid: host must pin");
    assert_eq!(example, swarm, "natfix-swarm.toml differs from natfix.toml in more than pin");
}

/// `natfix attach` arguments for one [[attach]] table (keys are its long flags).
fn attach_args(table: &toml::Table) -> Vec<String> {
    let mut args = vec!["natfix".to_owned(), "attach".to_owned()];
    for (key, value) in table {
        match value {
            toml::Value::Boolean(true) => args.push(format!("--{key}")),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    args.extend([format!("--{key}"), item.as_str().map_or_else(|| item.to_string(), str::to_owned)]);
                }
            }
            toml::Value::String(s) => args.extend([format!("--{key}"), s.clone()]),
            other => args.extend([format!("--{key}"), other.to_string()]),
        }
    }
    args
}

#[test]
fn example_config_is_what_natfix_attach_accepts() {
    let config = toml_file("natfix.toml");
    let attach = natfix::cli::command().find_subcommand("attach").cloned().expect("natfix attach");
    let flags: BTreeSet<String> = attach.get_arguments().filter_map(|a| a.get_long().map(str::to_owned)).collect();
    // Top level: settings for every attachment (attach's flags), and the agent's own.
    for key in config.keys() {
        assert!(flags.contains(key) || key == "attach" || key == "allow-published", "natfix.toml: `{key}` is no attach flag");
    }
    let tables = config["attach"].as_array().expect("[[attach]] tables");
    let mut targets = BTreeSet::new();
    for table in tables {
        let table = table.as_table().unwrap();
        let args = attach_args(table);
        let cli = natfix::cli::Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("natfix.toml: {args:?}: {e}"));
        let natfix::cli::Command::Attach(a) = cli.command else { unreachable!() };
        a.spec().unwrap_or_else(|e| panic!("natfix.toml: {args:?}: {e}"));
        // natfix keeps one attachment per interface and namespace.
        let target = (table.get("netns").map(ToString::to_string), table["iface"].to_string());
        assert!(targets.insert(target.clone()), "natfix.toml: two [[attach]] on {target:?}");
    }
    assert!(tables.len() >= 2, "both seed problems, host and ingress");
}

/// Runs `cmd`; None (after reporting the test skipped) when `tool` is not installed.
fn run_tool(tool: &str, cmd: &mut Command) -> Option<std::process::Output> {
    match cmd.output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            natfix_testkit::skip(&format!("{tool} is not installed (`cargo xtask deps` installs it)"));
            None
        }
        Err(e) => panic!("cannot run {tool}: {e}"),
    }
}

#[test]
fn compose_file_is_valid_for_docker_compose() {
    let Some(out) = run_tool("docker-compose", Command::new("docker-compose").arg("-f").arg(deploy("compose.yml")).args(["config", "-q"]))
    else {
        return;
    };
    assert!(out.status.success(), "docker-compose rejects compose.yml: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn systemd_unit_passes_systemd_analyze() {
    // verify also checks that ExecStart's program exists; the unit's path is
    // the install step's, so a copy points at an executable that exists here.
    let dir = std::env::temp_dir().join(format!("natfix-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unit = dir.join("natfix.service");
    let exe = std::env::current_exe().unwrap();
    std::fs::write(&unit, read("natfix.service").replace("/usr/local/bin/natfix", &exe.display().to_string())).unwrap();
    let verify = run_tool("systemd-analyze", Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&unit));
    // Exposure of the hardening, 0-100 (`systemd-analyze security` shows 0.0-10.0): it stays "OK" or better.
    let security = Command::new("systemd-analyze").args(["security", "--offline=true", "--threshold=50"]).arg(&unit).output();
    std::fs::remove_dir_all(&dir).unwrap();
    let Some(verify) = verify else { return };
    let text = |o: &std::process::Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(verify.status.success() && verify.stderr.is_empty(), "systemd-analyze verify: {}", text(&verify));
    let security = security.expect("systemd-analyze security");
    assert!(security.status.success(), "exposure above 5.0: {}", text(&security));
}
