//! Dockerfile frontend syntax: lexer, parser, parser directives, heredocs, BuildKit-compatible
//! variable expansion and lint checks. Every AST node carries its line/column span.
