//! Errors the user can act on, each with its own exit code.

/// A failure caused by input or environment, not by a natfix bug.
#[derive(Debug)]
pub enum UserError {
    /// Malformed options or values (exit 2, like clap's own errors).
    Usage(String),
    /// An interface, namespace or attachment that does not exist (exit 3).
    NotFound(String),
    /// Missing capabilities (exit 4).
    Privilege(String),
    /// The kernel or system lacks a feature natfix needs (exit 5).
    Unsupported(String),
    /// Something natfix would clash with is already there (exit 6).
    Conflict(String),
}

impl UserError {
    #[must_use]
    pub const fn exit_code(&self) -> i32 {
        match self {
            Self::Usage(_) => 2,
            Self::NotFound(_) => 3,
            Self::Privilege(_) => 4,
            Self::Unsupported(_) => 5,
            Self::Conflict(_) => 6,
        }
    }
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Usage(m) | Self::NotFound(m) | Self::Privilege(m) | Self::Unsupported(m) | Self::Conflict(m) => {
                f.write_str(m)
            }
        }
    }
}

impl std::error::Error for UserError {}

/// Exit code of `natfix diagnose` when at least one finding is a problem.
pub const EXIT_PROBLEMS: u8 = 10;

/// The exit code for any error: the first `UserError` in the chain decides, else 1.
#[must_use]
pub fn exit_code(err: &anyhow::Error) -> i32 {
    err.chain()
        .find_map(|e| e.downcast_ref::<UserError>())
        .map_or(1, UserError::exit_code)
}
