//! Refreshes `tests/corpus/*.hex` from the frame generators (fixed seed):
//! `cargo run -p natfix-testkit --bin write-corpus`. Frames that ever exposed
//! a difference are added to the files by hand; this overwrites them.

use natfix_testkit::frames;

fn main() {
    frames::write_corpus("guard.hex", frames::guard_frame(), 400, "guard programs (guard_differential.rs)");
    frames::write_corpus("overlay.hex", frames::overlay_frame(), 300, "overlay fixer (overlay_differential.rs)");
}
