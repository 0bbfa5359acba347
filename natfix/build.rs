//! Names the commit natfix is built from: `NATFIX_COMMIT` (`git describe
//! --always --dirty`, e.g. `b014499` or `b014499-dirty`), shown by
//! `natfix --version` and in the `natfix_build_info` metric, so an operator
//! can tell which build a node runs. Outside a git checkout (a source
//! tarball) it is `unknown`; packagers can set `NATFIX_COMMIT` themselves.

use std::{path::PathBuf, process::Command};

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=NATFIX_COMMIT");
    let commit = std::env::var("NATFIX_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["describe", "--always", "--dirty", "--abbrev=12"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=NATFIX_COMMIT={commit}");

    // Rerun when the commit or the tree's cleanliness can have changed: HEAD
    // and the ref it names move on commit and checkout, the index on add; the
    // sources of what goes into the binary on edits (dirty). In a worktree the
    // git dir (HEAD, index) and the common dir (refs) differ.
    let dir = |which: &str| git(&["rev-parse", "--path-format=absolute", which]).map(PathBuf::from);
    let mut watch: Vec<PathBuf> = ["src", "Cargo.toml", "../natfix-ebpf/src", "../bpf-headers"].iter().map(PathBuf::from).collect();
    if let (Some(git_dir), Some(common)) = (dir("--git-dir"), dir("--git-common-dir")) {
        watch.extend([git_dir.join("HEAD"), git_dir.join("index"), common.join("packed-refs")]);
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch.push(common.join(head_ref));
        }
    }
    // A path that does not exist would rerun the script on every build.
    for path in watch.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
