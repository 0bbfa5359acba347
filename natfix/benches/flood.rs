//! Flood benchmark (being written).
fn main() {}
