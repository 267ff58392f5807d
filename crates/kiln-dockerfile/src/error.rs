//! Errors with a source position, rendered as `file:line:col: message` plus the line and a caret.

use crate::ast::Span;

/// What kind of problem a [`ParseError`] is, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ErrorKind {
    /// The file has no instruction at all.
    Empty,
    /// A bad or repeated parser directive.
    Directive,
    /// The source could not be split into instructions (line too long, heredoc unterminated,
    /// bad JSON array, `ENV` without a value ...).
    Syntax,
    /// An instruction word BuildKit does not know.
    UnknownInstruction,
    /// An unknown flag, a flag given twice, or a flag with a bad value.
    Flag,
    /// A bad argument (missing, too many, malformed value).
    Argument,
    /// Variable expansion failed (`${V:?msg}`, bad substitution).
    Expansion,
}

/// A Dockerfile error with the span it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[error("{}:{}: {message}", span.start.line, span.start.column)]
pub struct ParseError {
    /// Category of the problem.
    pub kind: ErrorKind,
    /// One sentence saying what is wrong (BuildKit's wording where BuildKit has one).
    pub message: String,
    /// Where in the source.
    pub span: Span,
    /// For an error about one flag: what is wrong with it, as data, so that a caller (the
    /// frontend) can word the same mistake its own way. `None` for every other error.
    #[serde(skip)]
    pub flag: Option<Box<FlagError>>,
}

/// What is wrong with one instruction flag, found once by the parser crate's typed layer
/// ([`crate::instructions::lower`]); each layer words it itself (the parser's wording is
/// BuildKit's, in [`ParseError::message`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagError {
    /// The kind of mistake.
    pub kind: FlagErrorKind,
    /// The flag's name without `--`.
    pub flag: String,
    /// Its value as written (empty when it has none).
    pub value: String,
    /// Where the flag is written.
    pub span: Span,
}

/// The mistakes a flag can hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlagErrorKind {
    /// The instruction does not accept this flag.
    Unknown,
    /// A flag that may be given once is given again ([`FlagError::span`] is the repeat).
    Duplicate {
        /// Where it is first given.
        first: Span,
    },
    /// A flag that takes a value has none.
    MissingValue,
    /// A boolean flag with a value other than `true`/`false`.
    NotBoolean,
    /// `RUN --network` names no network mode.
    NetworkMode,
    /// `RUN --security` names no security mode.
    SecurityMode,
    /// `--chmod` is neither an octal nor a symbolic mode.
    Chmod,
    /// `COPY --from` holds a variable.
    FromVariable,
    /// A `--mount` value that does not parse; the text is the mount parser's reason.
    Mount(String),
    /// A HEALTHCHECK duration or count that does not parse (or a negative count).
    Healthcheck,
    /// A HEALTHCHECK duration above zero but under the 1ms minimum.
    HealthcheckTooShort,
    /// A flag on `HEALTHCHECK NONE`, which takes none.
    HealthcheckNone,
}

impl ParseError {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>, span: Span) -> Self {
        ParseError {
            kind,
            message: message.into(),
            span,
            flag: None,
        }
    }

    /// An [`ErrorKind::Flag`] error worded `message`, carrying what is wrong as `flag`.
    pub fn flag(flag: FlagError, message: impl Into<String>) -> Self {
        ParseError {
            kind: ErrorKind::Flag,
            message: message.into(),
            span: flag.span,
            flag: Some(Box::new(flag)),
        }
    }

    /// `file:line:col: message`, then the offending source line and a caret under the column.
    pub fn render(&self, file: &str, source: &str) -> String {
        let line_no = self.span.start.line.max(1);
        let column = self.span.start.column.max(1);
        let mut out = format!("{file}:{line_no}:{column}: {}", self.message);
        if let Some(line) = source.split('\n').nth(line_no - 1) {
            let line = line.strip_suffix('\r').unwrap_or(line);
            let line = line.strip_prefix('\u{feff}').unwrap_or(line);
            out.push('\n');
            out.push_str(line);
            out.push('\n');
            // Tabs are kept so the caret lines up in a terminal that expands them.
            let pad: String = line
                .chars()
                .take(column - 1)
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            out.push_str(&pad);
            out.push('^');
        }
        out
    }
}
