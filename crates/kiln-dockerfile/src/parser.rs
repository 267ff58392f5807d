//! The line-level parser: directives, continuations, comments, instruction splitting, flags,
//! JSON form and heredocs, following BuildKit's `frontend/dockerfile/parser` behaviour.

use crate::ast::*;
use crate::error::{ErrorKind, ParseError};
use crate::json::{decode_array, JsonArray};
use crate::shell::Lexer;

/// Go's `bufio.MaxScanTokenSize`: BuildKit refuses longer lines.
const MAX_LINE: usize = 64 * 1024;

/// Parses a Dockerfile the way BuildKit's parser does. Unknown instruction words are kept
/// (BuildKit's parser accepts them); [`crate::instructions::lower`] rejects them.
pub fn parse(source: &str) -> Result<Dockerfile, ParseError> {
    Parser::new(source).run()
}

/// Go's `strings.ToLower` for keyword comparison (İ lowers to a plain `i` in Go).
pub(crate) fn go_lower(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let v: Vec<char> = if c == '\u{130}' {
                vec!['i']
            } else {
                c.to_lowercase().collect()
            };
            v
        })
        .collect()
}

/// Go's `unicode.IsSpace` applied to a single byte converted to a rune (BuildKit does this
/// when it walks flags and HEALTHCHECK arguments byte by byte).
fn byte_is_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' | 0x85 | 0xa0)
}

/// BuildKit's `reWhitespace`: `[\t\v\f\r ]`.
fn is_re_ws(c: char) -> bool {
    matches!(c, '\t' | '\u{b}' | '\u{c}' | '\r' | ' ')
}

/// Go's `\s` in regexps: `[\t\n\f\r ]`.
fn is_re_s(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\u{c}' | '\r' | ' ')
}

fn trim_newline(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

fn is_comment(s: &str) -> bool {
    s.trim_start().starts_with('#')
}

/// Where a piece of the logical (joined) line came from.
#[derive(Debug, Clone, Copy)]
struct Seg {
    joined: usize,
    line: usize,
    byte: usize,
}

/// Maps byte offsets of a logical line back to source positions.
#[derive(Debug, Clone, Default)]
struct LineMap {
    segs: Vec<Seg>,
}

pub(crate) struct Parser<'a> {
    lines: Vec<&'a str>,
    /// Index of the first line that could not be read (too long), if any.
    too_long: Option<usize>,
    escape: char,
    directives: Vec<Directive>,
    directives_done: bool,
}

impl<'a> Parser<'a> {
    fn new(source: &'a str) -> Self {
        let had_bom = source.starts_with('\u{feff}');
        let source = source.strip_prefix('\u{feff}').unwrap_or(source);
        let mut lines = Vec::new();
        let mut too_long = None;
        for (i, l) in source.split_inclusive('\n').enumerate() {
            let limit = if l.ends_with('\n') {
                MAX_LINE
            } else {
                MAX_LINE - 1
            };
            // The BOM counts towards the first line's length, as in Go's scanner.
            let extra = if i == 0 && had_bom { 3 } else { 0 };
            if l.len() + extra > limit {
                too_long = Some(i);
                break;
            }
            lines.push(l);
        }
        Parser {
            lines,
            too_long,
            escape: '\\',
            directives: Vec::new(),
            directives_done: false,
        }
    }

    fn pos(&self, line: usize, byte: usize) -> Position {
        let text = self.lines.get(line).copied().unwrap_or("");
        let byte = byte.min(text.len());
        let column = text.get(..byte).map(|t| t.chars().count()).unwrap_or(byte) + 1;
        Position {
            line: line + 1,
            column,
        }
    }

    fn line_end(&self, line: usize) -> Position {
        let text = self.lines.get(line).copied().unwrap_or("");
        self.pos(line, trim_newline(text).len())
    }

    fn map(&self, m: &LineMap, offset: usize) -> Position {
        let seg = m
            .segs
            .iter()
            .rev()
            .find(|s| s.joined <= offset)
            .or(m.segs.first());
        match seg {
            Some(s) => self.pos(s.line, s.byte + (offset - s.joined.min(offset))),
            None => Position { line: 1, column: 1 },
        }
    }

    fn span(&self, m: &LineMap, start: usize, end: usize) -> Span {
        Span::new(self.map(m, start), self.map(m, end))
    }

    fn line_span(&self, line: usize) -> Span {
        Span::new(self.pos(line, 0), self.line_end(line))
    }

    /// BuildKit's directive regex `^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$`, applied while
    /// no other line has been seen.
    fn possible_directive(
        &mut self,
        line: &str,
        line_no: usize,
        lead: usize,
    ) -> Result<(), ParseError> {
        if self.directives_done {
            return Ok(());
        }
        let Some((name, value)) = match_directive(line) else {
            self.directives_done = true;
            return Ok(());
        };
        let key = name.to_ascii_lowercase();
        if !matches!(key.as_str(), "syntax" | "escape" | "check") {
            self.directives_done = true;
            return Ok(());
        }
        let span = Span::new(
            self.pos(line_no, lead),
            self.pos(line_no, lead + line.len()),
        );
        if self.directives.iter().any(|d| d.name == key) {
            return Err(ParseError::new(
                ErrorKind::Directive,
                format!("only one {key} parser directive can be used"),
                span,
            ));
        }
        if key == "escape" {
            match value {
                "\\" => self.escape = '\\',
                "`" => self.escape = '`',
                v => {
                    return Err(ParseError::new(
                        ErrorKind::Directive,
                        format!("invalid escape token '{v}' does not match ` or \\"),
                        span,
                    ))
                }
            }
        }
        self.directives.push(Directive {
            name: key,
            value: value.to_string(),
            span,
        });
        Ok(())
    }

    /// Removes a trailing continuation character; returns the text and whether the
    /// instruction ends on this line.
    fn trim_continuation<'s>(&self, line: &'s str) -> (&'s str, bool) {
        let t = line.trim_end_matches([' ', '\t']);
        if let Some(before) = t.strip_suffix(self.escape) {
            if before.is_empty() || !before.ends_with(self.escape) {
                return (before, false);
            }
        }
        (line, true)
    }

    fn run(mut self) -> Result<Dockerfile, ParseError> {
        let mut instructions = Vec::new();
        let mut warnings = Vec::new();
        let mut comments: Vec<String> = Vec::new();
        let mut idx = 0;
        while idx < self.lines.len() {
            let raw = self.lines[idx];
            let line_no = idx;
            idx += 1;
            if is_comment(raw) {
                // BuildKit takes the text after the first byte of the raw line.
                let c = raw.get(1..).unwrap_or("").trim();
                if c.is_empty() {
                    comments.clear();
                } else {
                    comments.push(c.to_string());
                }
            }
            let content = trim_newline(raw);
            let trimmed = content.trim_start();
            let lead = content.len() - trimmed.len();
            self.possible_directive(trimmed, line_no, lead)?;
            let text = if is_comment(trimmed) { "" } else { trimmed };
            let (first, mut ended) = self.trim_continuation(text);
            if ended && first.is_empty() {
                continue;
            }
            let mut joined = String::from(first);
            let mut map = LineMap::default();
            map.segs.push(Seg {
                joined: 0,
                line: line_no,
                byte: lead,
            });
            let mut last_line = line_no;
            let mut empty_continuation = false;
            while !ended && idx < self.lines.len() {
                let craw = self.lines[idx];
                let cno = idx;
                idx += 1;
                last_line = cno;
                let ccontent = trim_newline(craw);
                self.possible_directive(ccontent, cno, 0)?;
                if is_comment(craw) {
                    continue;
                }
                if ccontent.trim_start().is_empty() {
                    empty_continuation = true;
                    continue;
                }
                let (t, e) = self.trim_continuation(ccontent);
                ended = e;
                map.segs.push(Seg {
                    joined: joined.len(),
                    line: cno,
                    byte: 0,
                });
                joined.push_str(t);
            }
            if empty_continuation {
                warnings.push(ParseWarning {
                    message: format!("Empty continuation line found in: {joined}"),
                    span: self.line_span(last_line),
                });
            }
            let start_pos = self.pos(line_no, lead);
            let mut inst = self.node_from_line(&joined, 0, &map, std::mem::take(&mut comments))?;
            inst.span = Span::new(start_pos, self.line_end(last_line));

            let heredoc_target = match &inst.args {
                Args::Onbuild(child) => child,
                _ => &inst,
            };
            let can_heredoc = matches!(
                heredoc_target.kind(),
                Some(Keyword::Add | Keyword::Copy | Keyword::Run)
            ) && !matches!(heredoc_target.args, Args::Json(_));
            if can_heredoc && joined.contains("<<") {
                let err_span = Span::new(start_pos, self.line_end(last_line));
                let docs = heredocs_from_line(&joined)
                    .map_err(|m| ParseError::new(ErrorKind::Syntax, m, err_span))?;
                for mut doc in docs {
                    let body_start = idx;
                    let mut terminated = false;
                    let mut content = String::new();
                    while idx < self.lines.len() {
                        let l = self.lines[idx];
                        idx += 1;
                        last_line = idx - 1;
                        let mut possible = trim_newline(l);
                        if doc.chomp {
                            possible = possible.trim_start_matches('\t');
                        }
                        if possible == doc.name {
                            terminated = true;
                            break;
                        }
                        content.push_str(l);
                    }
                    if !terminated {
                        return Err(ParseError::new(
                            ErrorKind::Syntax,
                            "unterminated heredoc",
                            Span::new(start_pos, self.line_end(last_line)),
                        ));
                    }
                    doc.content = content;
                    doc.span = Span::new(self.pos(body_start, 0), self.line_end(last_line));
                    inst.heredocs.push(doc);
                }
                inst.span = Span::new(start_pos, self.line_end(last_line));
            }
            instructions.push(inst);
        }
        if instructions.is_empty() {
            let last = self.lines.len().saturating_sub(1);
            return Err(ParseError::new(
                ErrorKind::Empty,
                "file with no instructions",
                Span::new(self.pos(last, 0), self.pos(last, 0)),
            ));
        }
        if let Some(line) = self.too_long {
            let p = Position {
                line: line + 1,
                column: 1,
            };
            return Err(ParseError::new(
                ErrorKind::Syntax,
                format!(
                    "dockerfile line greater than max allowed size of {}",
                    MAX_LINE - 1
                ),
                Span::new(p, p),
            ));
        }
        Ok(Dockerfile {
            directives: self.directives,
            escape: self.escape,
            instructions,
            warnings,
        })
    }

    /// BuildKit's `newNodeFromLine`: `line` starts at byte `base` of the logical line.
    fn node_from_line(
        &self,
        line: &str,
        base: usize,
        map: &LineMap,
        comments: Vec<String>,
    ) -> Result<Instruction, ParseError> {
        let trimmed = line.trim();
        let t0 = base + (line.len() - line.trim_start().len());
        let (cmd, after) = match trimmed.find(is_re_ws) {
            Some(i) => {
                let rest = &trimmed[i..];
                let skip = rest.len() - rest.trim_start_matches(is_re_ws).len();
                (&trimmed[..i], Some((&trimmed[i + skip..], t0 + i + skip)))
            }
            None => (trimmed, None),
        };
        let mut flags = Vec::new();
        let mut args_text = "";
        let mut args_off = t0 + trimmed.len();
        if let Some((rest, off)) = after {
            let (remaining, rem_off, raw_flags) = extract_builder_flags(rest);
            for (text, s, e) in raw_flags {
                let body = text.get(2..).unwrap_or("");
                let (name, value) = match body.split_once('=') {
                    Some((n, v)) => (n.to_string(), Some(v.to_string())),
                    None => (body.to_string(), None),
                };
                flags.push(Flag {
                    name,
                    value,
                    span: self.span(map, off + s, off + e),
                });
            }
            let r = remaining.trim();
            args_off = off + rem_off + (remaining.len() - remaining.trim_start().len());
            args_text = r;
        }
        let inst_span = self.span(map, t0, t0 + trimmed.len());
        let mk_err = |kind, msg: String| ParseError::new(kind, msg, inst_span);
        let lower = go_lower(cmd);
        let keyword = Keyword::ALL
            .into_iter()
            .find(|k| k.as_str().to_ascii_lowercase() == lower);
        let word = |text: &str, off: usize| Word {
            text: text.to_string(),
            span: self.span(map, off, off + text.len()),
        };
        let args = match keyword {
            None => Args::Empty,
            Some(Keyword::Maintainer | Keyword::Stopsignal | Keyword::User | Keyword::Workdir) => {
                if args_text.is_empty() {
                    Args::Empty
                } else {
                    Args::Text(word(args_text, args_off))
                }
            }
            Some(Keyword::Expose | Keyword::From) => ws_delimited(args_text, args_off, &word),
            Some(Keyword::Cmd | Keyword::Entrypoint | Keyword::Run | Keyword::Shell) => {
                self.maybe_json(args_text, args_off, map, &word, &mk_err)?
            }
            Some(Keyword::Add | Keyword::Copy | Keyword::Volume) => match decode_array(args_text) {
                JsonArray::Strings(values) => Args::Json(JsonArgs {
                    values,
                    span: self.span(map, args_off, args_off + args_text.len()),
                }),
                JsonArray::NotStrings => return Err(mk_err(ErrorKind::Syntax, NOT_STRINGS.into())),
                JsonArray::Invalid => ws_delimited(args_text, args_off, &word),
            },
            Some(Keyword::Arg) => {
                let ws = parse_words(args_text, self.escape);
                if ws.is_empty() {
                    Args::Empty
                } else {
                    Args::Words(
                        ws.into_iter()
                            .map(|(t, s, e)| Word {
                                text: t,
                                span: self.span(map, args_off + s, args_off + e),
                            })
                            .collect(),
                    )
                }
            }
            Some(k @ (Keyword::Env | Keyword::Label)) => {
                self.name_val(args_text, args_off, k.as_str(), map, &word)?
            }
            Some(Keyword::Healthcheck) => {
                let b = args_text.as_bytes();
                let sep = b.iter().position(|&c| byte_is_space(c)).unwrap_or(b.len());
                let next = b[sep..]
                    .iter()
                    .position(|&c| !byte_is_space(c))
                    .map(|p| p + sep)
                    .unwrap_or(b.len());
                if sep == 0 {
                    Args::Empty
                } else {
                    // Byte-wise splitting can land inside a UTF-8 sequence; take the nearest
                    // character boundary (only reachable with U+0085/U+00A0 bytes).
                    let sep_c = floor_boundary(args_text, sep);
                    let next_c = ceil_boundary(args_text, next).max(sep_c);
                    let kind = word(&args_text[..sep_c], args_off);
                    let command = self.maybe_json(
                        &args_text[next_c..],
                        args_off + next_c,
                        map,
                        &word,
                        &mk_err,
                    )?;
                    Args::Healthcheck {
                        kind,
                        command: Box::new(command),
                    }
                }
            }
            Some(Keyword::Onbuild) => {
                if args_text.is_empty() {
                    Args::Empty
                } else {
                    let child = self.node_from_line(args_text, args_off, map, Vec::new())?;
                    Args::Onbuild(Box::new(child))
                }
            }
        };
        Ok(Instruction {
            keyword: cmd.to_string(),
            original: line.to_string(),
            flags,
            args,
            heredocs: Vec::new(),
            comments,
            span: inst_span,
        })
    }

    fn maybe_json(
        &self,
        text: &str,
        off: usize,
        map: &LineMap,
        word: &dyn Fn(&str, usize) -> Word,
        mk_err: &dyn Fn(ErrorKind, String) -> ParseError,
    ) -> Result<Args, ParseError> {
        if text.is_empty() {
            return Ok(Args::Empty);
        }
        Ok(match decode_array(text) {
            JsonArray::Strings(values) => Args::Json(JsonArgs {
                values,
                span: self.span(map, off, off + text.len()),
            }),
            JsonArray::NotStrings => return Err(mk_err(ErrorKind::Syntax, NOT_STRINGS.into())),
            JsonArray::Invalid => Args::Text(word(text, off)),
        })
    }

    /// ENV / LABEL: `KEY=value ...` or the legacy `KEY value`.
    fn name_val(
        &self,
        text: &str,
        off: usize,
        key: &str,
        map: &LineMap,
        word: &dyn Fn(&str, usize) -> Word,
    ) -> Result<Args, ParseError> {
        let words = parse_words(text, self.escape);
        let Some(first) = words.first() else {
            return Ok(Args::Empty);
        };
        if !first.0.contains('=') {
            let Some(i) = text.find(is_re_ws) else {
                return Err(ParseError::new(
                    ErrorKind::Syntax,
                    format!("{key} must have two arguments"),
                    self.span(map, off, off + text.len()),
                ));
            };
            let after = &text[i..];
            let skip = after.len() - after.trim_start_matches(is_re_ws).len();
            return Ok(Args::KeyValues(vec![KeyValue {
                key: word(&text[..i], off),
                value: word(&text[i + skip..], off + i + skip),
                legacy: true,
            }]));
        }
        let mut out = Vec::new();
        for (w, s, e) in words {
            let Some((k, v)) = w.split_once('=') else {
                return Err(ParseError::new(
                    ErrorKind::Syntax,
                    format!(
                        "Syntax error - can't find = in {}. Must be of the form: name=value",
                        crate::shell::go_quote(&w)
                    ),
                    self.span(map, off + s, off + e),
                ));
            };
            let eq = s + k.len();
            out.push(KeyValue {
                key: Word {
                    text: k.to_string(),
                    span: self.span(map, off + s, off + eq),
                },
                value: Word {
                    text: v.to_string(),
                    span: self.span(map, off + eq + 1, off + e),
                },
                legacy: false,
            });
        }
        Ok(Args::KeyValues(out))
    }
}

/// BuildKit's message for a JSON array with non-string elements.
const NOT_STRINGS: &str = "when using JSON array syntax, arrays must be comprised of strings only";

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_boundary(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// The directive regex; returns (name, value).
fn match_directive(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix('#')?;
    let rest = rest.trim_start_matches(is_re_s);
    let name_len = rest
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())))
        .map(|(i, _)| i)
        .unwrap_or(rest.len());
    if name_len == 0 {
        return None;
    }
    let name = &rest[..name_len];
    let rest = rest[name_len..].trim_start_matches(is_re_s);
    let rest = rest.strip_prefix('=')?;
    if rest.is_empty() || rest.contains('\n') {
        return None;
    }
    let v = rest.trim_start_matches(is_re_s);
    if v.is_empty() {
        // `.+?` must take one character: the last whitespace one.
        let last = rest.char_indices().last().map(|(i, _)| i).unwrap_or(0);
        return Some((name, &rest[last..]));
    }
    Some((name, v.trim_end_matches(is_re_s)))
}

/// Whitespace-delimited arguments (`reWhitespace.Split`).
fn ws_delimited(text: &str, off: usize, word: &dyn Fn(&str, usize) -> Word) -> Args {
    if text.is_empty() {
        return Args::Empty;
    }
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        if is_re_ws(c) {
            if let Some(s) = start.take() {
                out.push(word(&text[s..i], off + s));
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        out.push(word(&text[s..], off + s));
    }
    Args::Words(out)
}

/// BuildKit's `extractBuilderFlags`: reads leading `--flag` words byte by byte (so non-ASCII
/// bytes become Latin-1 characters, exactly as BuildKit does), always with `\` as escape.
/// Returns the remaining text, its byte offset, and the flags with their byte ranges.
fn extract_builder_flags(line: &str) -> (&str, usize, Vec<(String, usize, usize)>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let b = line.as_bytes();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut word_start = 0;
    let mut quote = 0u8;
    let mut blank_ok = false;
    let mut pos = 0;
    while pos <= b.len() {
        let ch = if pos < b.len() { b[pos] } else { 0 };
        if phase == Phase::Spaces {
            if pos == b.len() {
                break;
            }
            if byte_is_space(ch) {
                pos += 1;
                continue;
            }
            if ch != b'-' || pos + 1 == b.len() || b[pos + 1] != b'-' {
                let p = ceil_boundary(line, pos);
                return (&line[p..], p, words);
            }
            phase = Phase::Word;
            word_start = pos;
        }
        if pos == b.len() {
            if word != "--" && (blank_ok || !word.is_empty()) {
                words.push((std::mem::take(&mut word), word_start, pos));
            }
            break;
        }
        if phase == Phase::Word {
            if byte_is_space(ch) {
                phase = Phase::Spaces;
                if word == "--" {
                    let p = ceil_boundary(line, pos);
                    return (&line[p..], p, words);
                }
                if blank_ok || !word.is_empty() {
                    words.push((std::mem::take(&mut word), word_start, pos));
                }
                word.clear();
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == b'\'' || ch == b'"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
                pos += 1;
                continue;
            }
            let mut c = ch;
            if c == b'\\' {
                if pos + 1 == b.len() {
                    pos += 1;
                    continue;
                }
                pos += 1;
                c = b[pos];
            }
            word.push(c as char);
            pos += 1;
            continue;
        }
        // Quote phase.
        if ch == quote {
            phase = Phase::Word;
            pos += 1;
            continue;
        }
        let mut c = ch;
        if c == b'\\' {
            if pos + 1 == b.len() {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            pos += 1;
            c = b[pos];
        }
        word.push(c as char);
        pos += 1;
    }
    ("", line.len(), words)
}

/// BuildKit's `parseWords`: splits on whitespace keeping quotes and escapes in the words.
/// Returns each word with its byte range.
pub(crate) fn parse_words(rest: &str, escape: char) -> Vec<(String, usize, usize)> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let chars: Vec<(usize, char)> = rest.char_indices().collect();
    let n = chars.len();
    let at = |i: usize| if i < n { chars[i].0 } else { rest.len() };
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut start = 0;
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut i = 0;
    while i <= n {
        let ch = if i < n { chars[i].1 } else { '\0' };
        if phase == Phase::Spaces {
            if i == n {
                break;
            }
            if ch.is_whitespace() {
                i += 1;
                continue;
            }
            phase = Phase::Word;
            start = at(i);
        }
        if i == n {
            if blank_ok || !word.is_empty() {
                words.push((std::mem::take(&mut word), start, rest.len()));
            }
            break;
        }
        if phase == Phase::Word {
            if ch.is_whitespace() {
                phase = Phase::Spaces;
                if blank_ok || !word.is_empty() {
                    words.push((std::mem::take(&mut word), start, at(i)));
                }
                word.clear();
                blank_ok = false;
                i += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
            }
            if ch == escape {
                if i + 1 == n {
                    i += 1;
                    continue;
                }
                word.push(ch);
                i += 1;
                word.push(chars[i].1);
                i += 1;
                continue;
            }
            word.push(ch);
            i += 1;
            continue;
        }
        // Quote phase.
        if ch == quote {
            phase = Phase::Word;
        }
        if ch == escape && quote != '\'' {
            if i + 1 == n {
                phase = Phase::Word;
                i += 1;
                continue;
            }
            word.push(ch);
            i += 1;
            word.push(chars[i].1);
            i += 1;
            continue;
        }
        word.push(ch);
        i += 1;
    }
    words
}

/// BuildKit's `heredocsFromLine`: the heredoc markers of a line, lexed with `\` as escape.
fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, String> {
    let mut lex = Lexer::new('\\');
    lex.raw_quotes = true;
    lex.raw_escapes = true;
    lex.skip_unset_env = true;
    let Ok(words) = lex.process_words(line, &|_| None) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for w in words {
        if let Some(h) = parse_heredoc(&w)? {
            out.push(h);
        }
    }
    Ok(out)
}

/// BuildKit's `ParseHeredoc`: `[fd]<<[-]WORD` with the terminator's quotes removed.
pub(crate) fn parse_heredoc(word: &str) -> Result<Option<Heredoc>, String> {
    let digits = word.len() - word.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let Some(after) = word[digits..].strip_prefix("<<") else {
        return Ok(None);
    };
    let (chomp, after) = match after.strip_prefix('-') {
        Some(a) => (true, a),
        None => (false, after),
    };
    let rest = after.trim_start_matches(is_re_s);
    if rest.contains('<') {
        return Ok(None);
    }
    let fd = word[..digits].parse::<u64>().unwrap_or(0);
    if rest.is_empty() {
        return Ok(None);
    }
    let mut lex = Lexer::new('\\');
    lex.skip_unset_env = true;
    let words = lex
        .process_words(rest, &|_| None)
        .map_err(|e| e.to_string())?;
    if words.len() != 1 {
        return Ok(None);
    }
    lex.raw_quotes = true;
    let raw = lex
        .process_words(rest, &|_| None)
        .map_err(|e| e.to_string())?;
    if raw.len() != words.len() {
        return Err(format!(
            "internal lexing of heredoc produced inconsistent results: {rest}"
        ));
    }
    let quotes = |s: &str| s.chars().filter(|&c| c == '\'' || c == '"').count();
    let expand = quotes(&words[0]) == quotes(&raw[0]);
    Ok(Some(Heredoc {
        name: words[0].clone(),
        content: String::new(),
        chomp,
        expand,
        fd,
        span: Span::default(),
    }))
}
