//! Frontend errors: what is wrong, where in the Dockerfile, rendered like parse errors.

use kiln_dockerfile::{ErrorKind, ParseError, Span};

/// A Dockerfile that parses but cannot be lowered (missing stage, cycle, bad flag value ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", match span { Some(s) => format!("{}:{}: {message}", s.start.line, s.start.column), None => message.clone() })]
pub struct FrontendError {
    /// One sentence: what is wrong and, where useful, what to do.
    pub message: String,
    /// The instruction or flag it is about.
    pub span: Option<Span>,
}

impl FrontendError {
    pub(crate) fn new(message: impl Into<String>, span: Span) -> Self {
        Self {
            message: message.into(),
            span: Some(span),
        }
    }

    pub(crate) fn global(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            span: None,
        }
    }

    /// `file:line:col: message`, the offending line and a caret; `file: message` without a span.
    pub fn render(&self, file: &str, source: &str) -> String {
        match self.span {
            Some(span) => ParseError::new(ErrorKind::Argument, self.message.clone(), span)
                .render(file, source),
            None => format!("{file}: {}", self.message),
        }
    }
}
