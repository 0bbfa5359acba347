//! `natfix completions SHELL` and `natfix man [COMMAND]`: the CLI rendered
//! as a shell completion script or a roff man page. Both are generated from
//! the clap definition `cli::command()` hands in, so they cannot drift from
//! the flags natfix accepts. The one module below the CLI that sees clap
//! types: rendering the CLI is its job (`tests/e2e/architecture.rs`).

use std::io::Write;

use anyhow::{Context, Result, bail};

use crate::error::UserError;

/// Writes `shell`'s completion script for `cmd` to `out`.
pub fn completions(mut cmd: clap::Command, shell: clap_complete::Shell, out: &mut dyn Write) -> Result<()> {
    let name = cmd.get_name().to_owned();
    // Rendered into memory first: clap_complete panics on a failed write
    // (`natfix completions bash | head`), this returns the error.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    out.write_all(&script).and_then(|()| out.flush()).context("cannot write the completion script")
}

/// Writes the man page of `cmd`, or of its subcommand `sub` (natfix-SUB(1)), to `out`.
pub fn man(cmd: clap::Command, sub: Option<&str>, out: &mut dyn Write) -> Result<()> {
    // Built first, as clap_mangen does for its own page tree: a subcommand
    // then carries its display name (`natfix-attach`) and full usage.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    // Every page names the build (a subcommand has no version of its own).
    let source = format!("{} {}", cmd.get_name(), cmd.get_version().unwrap_or_default());
    let page = match sub {
        None => cmd,
        Some(name) => {
            let Some(found) = cmd.find_subcommand(name).cloned() else {
                let known: Vec<&str> = cmd.get_subcommands().map(clap::Command::get_name).collect();
                bail!(UserError::Usage(format!("no command `{name}`; man pages exist for: {}", known.join(", "))));
            };
            found
        }
    };
    clap_mangen::Man::new(page).source(source).render(out).context("cannot write the man page")?;
    out.flush().context("cannot write the man page")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that went away.
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn sample() -> clap::Command {
        clap::Command::new("natfix")
            .version("1.2.3 (abc)")
            .about("fixes")
            .subcommand(clap::Command::new("attach").about("attach it").arg(clap::Arg::new("iface").long("iface")))
    }

    #[test]
    fn completion_scripts_name_the_subcommands_and_flags() {
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
            let mut out = Vec::new();
            completions(sample(), shell, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("attach") && text.contains("iface"), "{shell}: {text}");
        }
        // A closed pipe (`natfix completions bash | head`) is an error, not a panic.
        assert!(completions(sample(), clap_complete::Shell::Bash, &mut Closed).is_err());
    }

    #[test]
    fn man_pages_of_the_tool_and_of_a_command() {
        let mut out = Vec::new();
        man(sample(), None, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(".ie"), "roff: {text}");
        assert!(text.contains(".TH natfix 1") && text.contains("1.2.3 (abc)"), "{text}");

        let mut out = Vec::new();
        man(sample(), Some("attach"), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(".TH natfix-attach 1") && text.contains("\\-\\-iface"), "{text}");
        assert!(text.contains("natfix 1.2.3 (abc)"), "the page names the build: {text}");

        let err = man(sample(), Some("nope"), &mut Vec::new()).unwrap_err();
        assert_eq!(crate::error::exit_code(&err), 2);
        assert!(err.to_string().contains("attach"), "{err}");
    }
}
