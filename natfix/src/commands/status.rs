//! `natfix status`: every attachment on the host, each checked against the
//! kernel (`observe::state`): what the records say, and whether it is so.

use anyhow::Result;
use serde_json::{Value, json};

use crate::{
    observe::state,
    pins::{self, Entry},
    record::{AttachmentMeta, process_alive},
};

pub fn run(json_out: bool) -> Result<()> {
    let entries: Vec<Value> = pins::entries()?.into_iter().map(|e| entry_json(&e)).collect::<Result<_>>()?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&json!({ "attachments": entries }))?);
        return Ok(());
    }
    if entries.is_empty() {
        println!("no natfix attachments");
    }
    for e in &entries {
        print_entry(e);
    }
    Ok(())
}

/// One entry as `status --json` prints it: the record's fields, in the
/// record's order, with `state` first, `problems` and each program's
/// `attached` and `runs_after` from the kernel.
fn entry_json(entry: &Entry) -> Result<Value> {
    Ok(match entry {
        Entry::Attachment(_, meta) => attachment_json(meta)?,
        Entry::Corrupt(dir, why) => json!({
            "state": "corrupt",
            "problems": [why],
            "path": dir.path.display().to_string(),
            "netns_inode": dir.netns_inode(),
            "iface": dir.iface_name(),
        }),
        Entry::Staging(dir, pid) => json!({
            "state": if process_alive(*pid) { "attaching" } else { "incomplete" },
            "problems": if process_alive(*pid) { vec![] } else {
                vec![format!("a natfix attach (pid {pid}) died half way; the next attach or detach in its namespace undoes it")]
            },
            "path": dir.path.display().to_string(),
            "netns_inode": dir.netns_inode(),
            "iface": dir.iface_name(),
            "pid": pid,
        }),
    })
}

fn attachment_json(meta: &AttachmentMeta) -> Result<Value> {
    let checked = state::check(meta);
    let mut out = serde_json::Map::new();
    out.insert("state".into(), checked.state.name().into());
    out.insert("problems".into(), json!(checked.problems));
    if let Some(now) = &checked.iface_now {
        out.insert("iface_now".into(), now.clone().into());
    }
    let Value::Object(record) = serde_json::to_value(meta)? else { anyhow::bail!("a record is an object") };
    for (key, mut value) in record {
        if key == "programs"
            && let Some(programs) = value.as_array_mut()
        {
            for (p, s) in programs.iter_mut().zip(checked.programs.iter().map(Some).chain(std::iter::repeat(None))) {
                p["attached"] = s.is_some_and(|s| s.attached).into();
                p["runs_after"] = json!(s.map(|s| s.runs_after.clone()).unwrap_or_default());
            }
        }
        out.insert(key, value);
    }
    out.insert("unrecorded_programs".into(), json!(checked.unrecorded_programs));
    Ok(Value::Object(out))
}

fn print_entry(e: &Value) {
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let owner = e["pid"].as_u64().map_or_else(String::new, |p| format!(" pid {p}"));
    let netns = if e["netns"].is_null() { format!("inode {}", e["netns_inode"]) } else { format!("{} (inode {})", s(&e["netns"]), e["netns_inode"]) };
    println!("{} netns {netns} {}{owner}", s(&e["iface"]), s(&e["state"]));
    for problem in e["problems"].as_array().into_iter().flatten() {
        println!("  ! {}", s(problem));
    }
    if matches!(e["state"].as_str(), Some("stale" | "interface-gone" | "detached" | "corrupt" | "incomplete")) {
        let ns = e["netns"].as_str().filter(|n| *n != "self").map_or_else(String::new, |n| format!(" --netns {n}"));
        println!("  `natfix detach --iface {}{ns}` releases it", s(&e["iface"]));
    }
    for p in e["programs"].as_array().into_iter().flatten() {
        let attached = if p["attached"].as_bool() == Some(true) { "" } else { "  NOT ATTACHED" };
        println!("  {:<20} {:<10} {:<8} prog id {}{attached}", s(&p["name"]), s(&p["hook"]), s(&p["mode"]), p["prog_id"]);
    }
    if let Some(o) = e["overlay"].as_object() {
        let table = o["changes"]["nft_table"].as_str().map_or_else(String::new, |t| format!(" (nft table ip {t})"));
        println!("  overlay vxlan ports {} csum {} backend {}{table}", o["vxlan_ports"], s(&o["csum"]), s(&o["backend"]));
    }
    if let Some(g) = e["guard"].as_object() {
        let ranges: Vec<String> = g["ranges"].as_array().into_iter().flatten().map(s).collect();
        let dry = if g["dry_run"].as_bool() == Some(true) { " dry-run" } else { "" };
        println!("  guard ports {} flow source {} ({}){dry}", ranges.join(","), s(&g["flow_source"]), s(&g["filtering"]));
        let list = |k: &str| g.get(k).and_then(Value::as_array).filter(|a| !a.is_empty()).map(|a| a.iter().map(ToString::to_string).collect::<Vec<_>>().join(","));
        if let Some(p) = list("allow_ports") {
            println!("  exempt ports {p}");
        }
        if let Some(p) = list("published") {
            println!("  published ports {p} (exempt while published)");
        }
    }
}
