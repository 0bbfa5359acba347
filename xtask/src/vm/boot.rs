//! Booting the VM under qemu/TCG and reading the scenario's result from its serial console.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The line /init prints with the result.
const RESULT_MARKER: &str = "NATFIX-RESULT ";

pub(super) struct Outcome {
    pub(super) result_json: String,
    pub(super) elapsed: Duration,
}

/// What one boot is given.
pub(super) struct BootSpec<'a> {
    pub(super) image: &'a Path,
    pub(super) initrd: &'a Path,
    pub(super) cmdline: &'a str,
    pub(super) timeout: Duration,
    pub(super) verbose: bool,
    /// Where the serial console is written.
    pub(super) log_path: &'a Path,
}

/// What the console showed.
#[derive(Default)]
struct Console {
    result: Option<String>,
    panic: Option<String>,
    timed_out: bool,
}

pub(super) fn boot(spec: &BootSpec<'_>) -> Result<Outcome> {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "1024", "-smp", "2", "-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(spec.image)
        .arg("-initrd")
        .arg(spec.initrd)
        .arg("-append")
        .arg(spec.cmdline)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run qemu-system-x86_64 (cargo xtask deps)")?;
    let mut stderr = child.stderr.take().context("qemu stderr")?;
    let stderr_reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    // Whatever happens while watching, qemu must not outlive this function.
    let console = watch_console(&mut child, spec, started + spec.timeout);
    if console.as_ref().map_or(true, |c| c.timed_out) {
        let _ = child.kill();
    }
    let status = child.wait()?;
    let console = console?;
    let qemu_stderr = stderr_reader.join().unwrap_or_default();
    let elapsed = started.elapsed();
    let tail = || tail_lines(spec.log_path, 30);
    if console.timed_out {
        bail!("the VM did not finish within {} s; last console lines:\n{}", spec.timeout.as_secs(), tail());
    }
    if let Some(line) = console.panic {
        bail!("kernel panic: {line}\n{}", tail());
    }
    match console.result {
        Some(result_json) => Ok(Outcome { result_json, elapsed }),
        None => bail!(
            "the VM exited ({status}) without a {} line; qemu: {}\nlast console lines:\n{}",
            RESULT_MARKER.trim(),
            qemu_stderr.trim(),
            tail()
        ),
    }
}

/// Reads qemu's console lines into the log until qemu exits or `deadline` passes.
fn watch_console(child: &mut Child, spec: &BootSpec<'_>, deadline: Instant) -> Result<Console> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().context("qemu stdout")?;
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_owned();
            if tx.send(text).is_err() {
                break;
            }
            line.clear();
        }
    });
    let mut log = fs::File::create(spec.log_path).with_context(|| format!("cannot create {}", spec.log_path.display()))?;
    let mut console = Console::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                writeln!(log, "{line}")?;
                if spec.verbose {
                    eprintln!("| {line}");
                }
                if let Some(json) = extract_result(&line) {
                    console.result = Some(json.to_owned());
                }
                if console.panic.is_none() && line.contains("Kernel panic") {
                    console.panic = Some(line);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                console.timed_out = true;
                return Ok(console);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(console),
        }
    }
}

fn extract_result(line: &str) -> Option<&str> {
    line.find(RESULT_MARKER).map(|i| line[i + RESULT_MARKER.len()..].trim())
}

fn tail_lines(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_line_is_found_after_console_noise() {
        assert_eq!(extract_result("\r[  1.0] x NATFIX-RESULT {\"a\":1} "), Some("{\"a\":1}"));
        assert_eq!(extract_result("NATFIX-RESULT"), None);
    }
}
