//! Errors from the external systems behind [`Blob`](crate::Blob) and
//! [`Consensus`](crate::Consensus).

use std::error::Error;
use std::fmt;

/// A failure of an operation on an external system.
///
/// The variant tells a caller what it may assume about the operation's
/// effect, which decides how it can retry.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    /// The operation certainly did not take effect.
    #[error(transparent)]
    Determinate(#[from] Determinate),
    /// The operation may or may not have taken effect (for example the
    /// connection broke after the request was sent).
    #[error(transparent)]
    Indeterminate(#[from] Indeterminate),
}

impl ExternalError {
    /// Returns a determinate error with this message.
    pub fn determinate(message: impl Into<String>) -> Self {
        ExternalError::Determinate(Determinate::new(message))
    }

    /// Returns an indeterminate error with this message.
    pub fn indeterminate(message: impl Into<String>) -> Self {
        ExternalError::Indeterminate(Indeterminate::new(message))
    }

    /// Whether the operation certainly did not take effect.
    pub fn is_determinate(&self) -> bool {
        matches!(self, ExternalError::Determinate(_))
    }

    /// The human-readable description, without the determinacy.
    pub fn message(&self) -> &str {
        match self {
            ExternalError::Determinate(e) => &e.message,
            ExternalError::Indeterminate(e) => &e.message,
        }
    }
}

/// An error after which the operation certainly did not take effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Determinate {
    message: String,
}

impl Determinate {
    /// Returns the error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Determinate {
            message: message.into(),
        }
    }
}

impl fmt::Display for Determinate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Error for Determinate {}

/// An error after which the operation may or may not have taken effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indeterminate {
    message: String,
}

impl Indeterminate {
    /// Returns the error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Indeterminate {
            message: message.into(),
        }
    }
}

impl fmt::Display for Indeterminate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "indeterminate: {}", self.message)
    }
}

impl Error for Indeterminate {}

/// Formats `err` followed by each of its sources, so the root cause (often
/// the most useful part of a driver error) is not lost.
pub(crate) fn chain(context: &str, err: &dyn Error) -> String {
    let mut out = format!("{context}: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        let cause = cause.to_string();
        if !out.ends_with(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
        source = err_source(source);
    }
    out
}

fn err_source<'a>(err: Option<&'a (dyn Error + 'static)>) -> Option<&'a (dyn Error + 'static)> {
    err.and_then(|e| e.source())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("connection failed")
        }
    }
    impl Error for Outer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn chain_includes_root_cause() {
        let err = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert_eq!(
            chain("open db", &err),
            "open db: connection failed: refused"
        );
    }

    #[test]
    fn determinacy_is_kept() {
        assert!(ExternalError::determinate("x").is_determinate());
        let e = ExternalError::indeterminate("timed out");
        assert!(!e.is_determinate());
        assert_eq!(e.message(), "timed out");
        assert_eq!(e.to_string(), "indeterminate: timed out");
    }
}
