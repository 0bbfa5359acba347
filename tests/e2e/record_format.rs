//! The pinned record is a stable format: records written by earlier natfix
//! (fixtures captured from the code before the userspace restructuring, and
//! a kernel < 6.6 clsact record) are read by this code, and what it writes
//! for them is byte for byte what was there.

use std::path::Path;

use natfix::record::{AttachMode, AttachmentMeta, Hook, Program};
use natfix_testkit::{natfix, root_setup, scratch_ns, veth};

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/records").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const SAME_BYTES: &[&str] = &[
    "guard-own-xdp-pinned.json",
    "guard-conntrack-tc-overlay-nft-pinned.json",
    "overlay-both-recompute-pinned.json",
    "guard-own-tc-foreground.json",
    "guard-own-clsact-pinned.json",
];

#[test]
fn earlier_records_read_and_write_back_unchanged() {
    for name in SAME_BYTES {
        let text = fixture(name);
        let meta: AttachmentMeta = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(serde_json::to_string(&meta).unwrap(), text, "{name}");
    }
    let clsact: AttachmentMeta = serde_json::from_str(&fixture("guard-own-clsact-pinned.json")).unwrap();
    assert!(clsact.programs.iter().all(|p| p.mode == AttachMode::Clsact) && clsact.created_clsact);
    assert_eq!(clsact.program_at(Hook::TcEgress).map(|p| p.name), Some(Program::FlowEgress));
    // Before namespace cookies existed: read, with no cookie.
    let old: AttachmentMeta = serde_json::from_str(&fixture("overlay-before-cookies.json")).unwrap();
    assert_eq!(old.netns_cookie, None);
    assert!(old.written_in(Some(42)), "a record without a cookie is taken as this namespace's");
}

/// An attachment whose record was written by the earlier code (its bytes put
/// into the meta map by hand) is listed by `status` and removed by `detach`.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn status_and_detach_read_a_record_written_before() {
    root_setup();
    let host = scratch_ns("recfmt");
    let peer = scratch_ns("recfmt-peer");
    veth(&host, "rf0", "10.69.0.1/24", &peer, "rf1", "10.69.0.2/24").unwrap();
    let out = natfix(&["attach", "--netns", &host.name, "--iface", "rf0", "--guard", "20000-30000", "--flow-source", "own", "--pin"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = natfix::pins::PinDir::new(host.netns().unwrap().inode, &"rf0".parse().unwrap());
    let now = dir.read_meta().unwrap();
    // The earlier code's bytes, with this attachment's identity and programs.
    let mut old: serde_json::Value = serde_json::from_str(&fixture("guard-own-xdp-pinned.json")).unwrap();
    old["netns"] = now.netns.clone().into();
    old["netns_path"] = now.netns_path.clone().into();
    old["netns_inode"] = now.netns_inode.into();
    old["netns_cookie"] = now.netns_cookie.into();
    old["iface"] = "rf0".into();
    old["ifindex"] = now.ifindex.into();
    // As the earlier code recorded programs: no link ids (status then finds them on the hooks).
    old["programs"] = now
        .programs
        .iter()
        .map(|p| serde_json::json!({ "name": p.name, "hook": p.hook, "mode": p.mode, "prog_id": p.prog_id }))
        .collect();
    let bytes = serde_json::to_vec(&old).unwrap();
    overwrite_meta(&dir.meta_path(), &bytes);

    let status: serde_json::Value = serde_json::from_slice(&natfix(&["status", "--json"]).stdout).unwrap();
    let entry = status["attachments"].as_array().unwrap().iter().find(|a| a["iface"] == "rf0").expect("listed").clone();
    for (key, value) in old.as_object().unwrap() {
        if key == "programs" {
            continue;
        }
        assert_eq!(&entry[key], value, "status --json shows the record's {key} as it was written");
    }
    let programs = entry["programs"].as_array().unwrap();
    assert_eq!(programs.len(), 2);
    for (shown, written) in programs.iter().zip(old["programs"].as_array().unwrap()) {
        for (key, value) in written.as_object().unwrap() {
            assert_eq!(&shown[key], value, "program {key}");
        }
        assert_eq!(shown["attached"], true, "found on its hook without a link id: {shown}");
    }
    assert_eq!(entry["state"], "pinned", "{entry}");
    let out = natfix(&["detach", "--netns", &host.name, "--iface", "rf0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.path.exists(), "pins removed");
    assert!(natfix_testkit::xdp_prog_id(&host, "rf0").unwrap().is_none(), "XDP detached");
}

/// Writes `bytes` (NUL-padded) into the pinned one-slot meta array, as the
/// earlier code did.
fn overwrite_meta(path: &Path, bytes: &[u8]) {
    let data = aya::maps::MapData::from_pin(path).unwrap();
    let mut array: aya::maps::Array<aya::maps::MapData, [u8; 4096]> = aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
    let mut value = [0u8; 4096];
    value[..bytes.len()].copy_from_slice(bytes);
    array.set(0, value, 0).unwrap();
}
