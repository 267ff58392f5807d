//! Dockerfile frontend syntax: lexer, parser, parser directives, heredocs, BuildKit-compatible
//! variable expansion and lint checks. Every AST node carries its line/column span.
//!
//! - [`parse`] turns source text into a [`Dockerfile`] (raw instructions, as BuildKit's parser).
//! - [`shell::Lexer`] is BuildKit's shell lexer (quotes, escapes, `${V:-w}` expansion).

pub mod ast;
pub mod dockerignore;
pub mod error;
pub mod instructions;
mod json;
pub mod lint;
mod parser;
pub mod shell;

pub use ast::{
    Args, Directive, Dockerfile, Flag, Heredoc, Instruction, JsonArgs, KeyValue, Keyword,
    ParseWarning, Position, Span, Word,
};
pub use error::{ErrorKind, ParseError};
pub use parser::parse;
