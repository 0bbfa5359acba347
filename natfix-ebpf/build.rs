//! Compiles the C eBPF programs in `src/*.bpf.c` with clang and links each
//! object with `bpftool gen object`. The eBPF side is C because this
//! toolchain has no `rust-src` (aya-ebpf needs it to build `core` for BPF).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// Debian packages that provide the compiler, the linker and the headers.
const DEBIAN_PACKAGES: &[&str] = &["clang-19", "llvm-19", "libbpf-dev", "bpftool", "linux-libc-dev"];

/// One output object: the C files linked into it and the extra defines.
struct BpfObject {
    name: &'static str,
    sources: &'static [&'static str],
    defines: &'static [&'static str],
    /// Built only for the test rig (the `rig` feature).
    rig: bool,
}

const OBJECTS: &[BpfObject] = &[
    // Own flow table: the ingress guard (XDP or tc) and the egress learner share maps.
    BpfObject {
        name: "guard",
        sources: &["guard_xdp", "guard_tc", "flow_egress"],
        defines: &[],
        rig: false,
    },
    // Conntrack kfunc flavour: one object per hook (libbpf's linker cannot
    // merge two objects that both declare the same kfunc extern).
    BpfObject {
        name: "guard_xdp_ct",
        sources: &["guard_xdp"],
        defines: &["-DNATFIX_FLOW_CONNTRACK"],
        rig: false,
    },
    BpfObject {
        name: "guard_tc_ct",
        sources: &["guard_tc"],
        defines: &["-DNATFIX_FLOW_CONNTRACK"],
        rig: false,
    },
    // Checksum repair of decrypted VXLAN (tc ingress on the underlay).
    BpfObject {
        name: "overlay",
        sources: &["overlay_tc"],
        defines: &[],
        rig: false,
    },
    // `natfix trace`: BTF tracepoint programs (drops, transmits, socket deliveries).
    BpfObject {
        name: "trace",
        sources: &["trace_tp"],
        defines: &[],
        rig: false,
    },
    // Test rig: empty programs (the baseline of every benchmark ratio), the
    // flood generator and the counting sinks.
    BpfObject {
        name: "rig",
        sources: &["rig_empty", "rig_traffic", "rig_tp_empty"],
        defines: &[],
        rig: true,
    },
];

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = manifest.join("src");
    let headers = manifest.join("../bpf-headers");
    println!("cargo:rerun-if-changed={}", headers.display());
    println!("cargo:rerun-if-env-changed=NATFIX_CLANG");

    let clang = env::var("NATFIX_CLANG").unwrap_or_else(|_| "clang-19".to_owned());
    ensure_tools(&clang);
    let multiarch = multiarch();

    let rig = env::var_os("CARGO_FEATURE_RIG").is_some();
    for object in OBJECTS.iter().filter(|o| rig || !o.rig) {
        let mut parts = Vec::new();
        for source in object.sources {
            let input = src.join(format!("{source}.bpf.c"));
            println!("cargo:rerun-if-changed={}", input.display());
            let part = out.join(format!("{}.{source}.o", object.name));
            let status = Command::new(&clang)
                .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror", "-D__TARGET_ARCH_x86"])
                .args(object.defines)
                .arg("-I")
                .arg(&headers)
                .arg("-idirafter")
                .arg(format!("/usr/include/{multiarch}"))
                .arg("-c")
                .arg(&input)
                .arg("-o")
                .arg(&part)
                .status()
                .unwrap_or_else(|e| panic!("cannot run {clang}: {e}"));
            assert!(status.success(), "{clang} failed on {}", input.display());
            parts.push(part);
        }
        link(&out.join(format!("{}.bpf.o", object.name)), &parts);
    }
}

fn link(output: &Path, parts: &[PathBuf]) {
    if let [single] = parts {
        std::fs::copy(single, output).expect("copy object");
        return;
    }
    let status = Command::new("bpftool")
        .args(["gen", "object"])
        .arg(output)
        .args(parts)
        .status()
        .expect("cannot run bpftool");
    assert!(status.success(), "bpftool gen object failed for {}", output.display());
}

fn multiarch() -> String {
    Command::new("gcc")
        .arg("-print-multiarch")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "x86_64-linux-gnu".to_owned())
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Installs the Debian packages when a tool is missing and we are root;
/// otherwise fails with the command the user has to run.
fn ensure_tools(clang: &str) {
    let headers_present = Path::new("/usr/include/bpf/bpf_helpers.h").exists()
        && Path::new("/usr/include/linux/bpf.h").exists();
    if have(clang) && have("bpftool") && headers_present {
        return;
    }
    let install = format!("apt-get install -y {}", DEBIAN_PACKAGES.join(" "));
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    assert!(is_root, "natfix-ebpf needs {clang}, bpftool and libbpf headers; run: sudo {install}");
    println!("cargo:warning=installing {}", DEBIAN_PACKAGES.join(" "));
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("apt-get update -qq && DEBIAN_FRONTEND=noninteractive {install} -qq"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "`{install}` failed; install the packages and build again");
}
