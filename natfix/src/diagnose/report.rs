//! Findings and how they are printed: the table, and the JSON schema the
//! module documentation fixes.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Evidence lists longer than this are cut, with a count of the rest.
pub(super) const MAX_EVIDENCE: usize = 24;


#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Problem,
}

impl Severity {
    fn name(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Problem => "problem",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub check: String,
    pub severity: Severity,
    pub summary: String,
    pub evidence: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// The `natfix trace` command that shows the problem packet by packet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

impl Finding {
    pub(super) fn new(check: &str, severity: Severity, summary: impl Into<String>) -> Self {
        Self {
            check: check.to_owned(),
            severity,
            summary: summary.into(),
            evidence: Vec::new(),
            fix: None,
            trace: None,
        }
    }

    pub(super) fn evidence(mut self, lines: impl IntoIterator<Item = String>) -> Self {
        let mut lines: Vec<String> = lines.into_iter().collect();
        if lines.len() > MAX_EVIDENCE {
            let rest = lines.len() - (MAX_EVIDENCE - 1);
            lines.truncate(MAX_EVIDENCE - 1);
            lines.push(format!("... and {rest} more"));
        }
        self.evidence.extend(lines);
        self
    }

    pub(super) fn fix(mut self, fix: Option<String>) -> Self {
        self.fix = fix;
        self
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    #[must_use]
    pub fn count(&self, severity: Severity) -> usize {
        self.findings.iter().filter(|f| f.severity == severity).count()
    }
}


pub(super) fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The human table: one row per finding, evidence and fix indented below it.
#[must_use]
pub fn render_table(report: &Report) -> String {
    let width = report.findings.iter().map(|f| f.check.len()).max().unwrap_or(5).max(5);
    let mut s = format!("{:<8}  {:<width$}  SUMMARY\n", "SEVERITY", "CHECK");
    let pad = " ".repeat(8 + 2 + width + 2);
    for f in &report.findings {
        let _ = writeln!(s, "{:<8}  {:<width$}  {}", f.severity.name(), f.check, f.summary);
        for e in &f.evidence {
            let _ = writeln!(s, "{pad}- {e}");
        }
        if let Some(fix) = &f.fix {
            let _ = writeln!(s, "{pad}fix: {fix}");
        }
        if let Some(trace) = &f.trace {
            let _ = writeln!(s, "{pad}trace: {trace}");
        }
    }
    let _ = writeln!(
        s,
        "\n{}, {}, {} info",
        counted(report.count(Severity::Problem), "problem", "problems"),
        counted(report.count(Severity::Warning), "warning", "warnings"),
        report.count(Severity::Info)
    );
    s
}


