//! `natfix diagnose`: gathers, judges, prints; says whether problems were found.

use std::{io::Write as _, time::Duration};

use anyhow::Result;

use crate::diagnose::{Severity, analyze, gather, render_table};

/// Prints the report; returns whether it has a `problem` finding (exit 10).
pub fn run(netns: Option<&str>, json: bool, sample: Duration) -> Result<bool> {
    let facts = gather(netns, sample)?;
    let report = analyze(&facts);
    let text = if json {
        let mut j = serde_json::to_string_pretty(&report)?;
        j.push('\n');
        j
    } else {
        render_table(&report)
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(report.count(Severity::Problem) > 0)
}
