//! BuildKit's shell lexer: quote and escape removal, variable expansion and word splitting
//! for instruction arguments (`ProcessWord` / `ProcessWords`).
//!
//! Semantics follow BuildKit's `frontend/dockerfile/shell` package:
//! - `'...'` is literal; in `"..."` only `$` expands and the escape character escapes
//!   `"`, `$` and itself (any other escape is kept as written);
//! - outside quotes the escape character escapes any character (a trailing one is dropped);
//! - `$V`, `${V}`, `${V:-w}`, `${V-w}`, `${V:+w}`, `${V+w}`, `${V:?msg}`, `${V?msg}`,
//!   `${V#p}`, `${V##p}`, `${V%p}`, `${V%%p}`, `${V/p/r}`, `${V//p/r}`; patterns know `*` and
//!   `?` (no bracket expressions, like BuildKit);
//! - `$` followed by no name stays `$`; `$1`, `$@`, `$*`, `$#`, `$?`, `$-`, `$$`, `$!`, `$0`
//!   are names (normally unset);
//! - word splitting (ProcessWords) happens on unquoted whitespace, including whitespace that
//!   came from an expanded variable.
//!
//! Instructions whose arguments BuildKit expands (its `replaceEnvAllowed` list): ADD, COPY,
//! ENV, EXPOSE, FROM, LABEL, STOPSIGNAL, USER, VOLUME, WORKDIR, ARG (names and defaults).
//! ONBUILD is kept verbatim; RUN, CMD, ENTRYPOINT, SHELL and HEALTHCHECK are NOT expanded by
//! the builder (the shell in the container does it). See [`EXPANDING_INSTRUCTIONS`] and
//! [`expands_words`].
//!
//! Flags, checked against BuildKit v0.24:
//! - expanded: `FROM --platform` (global ARGs only), `COPY`/`ADD --chown`, `--chmod`,
//!   `ADD --checksum`, and each field value of `RUN --mount` (split first, then expanded);
//! - refused when they hold a variable (`$` followed by anything): `COPY --from` and
//!   `RUN --mount=from=` (the stage graph is fixed before variables have values; a stage
//!   `FROM ${GLOBAL_ARG} AS alias` is the workaround);
//! - read as written: `RUN --network`, `--security`, `COPY --exclude` (moby/buildkit#6072),
//!   the boolean flags (`--link`, `--parents`, `--keep-git-dir`, `--unpack`) and the
//!   `HEALTHCHECK` durations and retries.
//!
//! One word's expansion is bounded ([`MAX_EXPANDED_CHARS`], [`MAX_EXPANSION_WORK`]) so that
//! variables built from variables cannot exhaust memory or time.

use std::collections::BTreeSet;

use crate::ast::Keyword;

/// Instructions whose arguments the builder expands before use (BuildKit's list).
pub const EXPANDING_INSTRUCTIONS: [Keyword; 11] = [
    Keyword::Add,
    Keyword::Copy,
    Keyword::Env,
    Keyword::Expose,
    Keyword::From,
    Keyword::Label,
    Keyword::Stopsignal,
    Keyword::User,
    Keyword::Volume,
    Keyword::Workdir,
    Keyword::Arg,
];

/// Whether the builder expands variables in this instruction's arguments, and whether it
/// uses word splitting (`ProcessWords`) rather than one word per argument (`ProcessWord`).
/// Returns `None` when the instruction is not expanded at all.
pub fn expands_words(keyword: Keyword) -> Option<bool> {
    match keyword {
        // BuildKit expands each argument word by word, splitting on whitespace.
        Keyword::Add | Keyword::Copy | Keyword::Volume | Keyword::Expose => Some(true),
        Keyword::Env
        | Keyword::Label
        | Keyword::Arg
        | Keyword::From
        | Keyword::Stopsignal
        | Keyword::User
        | Keyword::Workdir => Some(false),
        _ => None,
    }
}

/// A failure to expand a word, e.g. `${V:?must be set}` with V unset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to process {}: {reason}", go_quote(word))]
pub struct ExpandError {
    /// The word being processed.
    pub word: String,
    /// BuildKit's message, e.g. `syntax error: missing '}'`.
    pub reason: String,
}

/// The result of processing a word.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Expansion {
    /// The word with quotes and escapes removed and variables expanded (`ProcessWord`).
    pub value: String,
    /// The same, split into words (`ProcessWords`).
    pub words: Vec<String>,
    /// Variable names that were referenced and found by the lookup.
    pub used: BTreeSet<String>,
    /// Variable names that were referenced but not set.
    pub unset: BTreeSet<String>,
}

/// Longest value (in characters) one word may expand to, unless the word as written is
/// longer. `ARG V1=$V0$V0`, `ARG V2=$V1$V1`, ... doubles a value on every line: without a cap
/// thirty such lines ask for gigabytes, even for `--dry-run`.
pub const MAX_EXPANDED_CHARS: usize = 1 << 20;

/// Work one word's expansion may do, in characters read from variables, written by
/// `${V/p/r}` replacements and pattern-match steps. Bounds CPU the way
/// [`MAX_EXPANDED_CHARS`] bounds memory (a pattern replacement over a long value is
/// quadratic).
pub const MAX_EXPANSION_WORK: usize = 64 << 20;

/// The shell lexer, configured like BuildKit's `shell.Lex`.
#[derive(Debug, Clone, Copy)]
pub struct Lexer {
    escape: char,
    /// Longest value a word may expand to (see [`MAX_EXPANDED_CHARS`]).
    pub max_chars: usize,
    /// Work budget of one word (see [`MAX_EXPANSION_WORK`]).
    pub max_work: usize,
    /// Keep quote characters in the output.
    pub raw_quotes: bool,
    /// Keep escape characters in the output.
    pub raw_escapes: bool,
    /// Treat quotes as ordinary characters.
    pub skip_process_quotes: bool,
    /// Leave references to unset variables as written instead of expanding to "".
    pub skip_unset_env: bool,
}

impl Lexer {
    /// A lexer for the given escape character (`\` or `` ` ``).
    pub fn new(escape: char) -> Self {
        Lexer {
            escape,
            max_chars: MAX_EXPANDED_CHARS,
            max_work: MAX_EXPANSION_WORK,
            raw_quotes: false,
            raw_escapes: false,
            skip_process_quotes: false,
            skip_unset_env: false,
        }
    }

    /// Processes `word`, looking variables up with `lookup`.
    pub fn expand(
        &self,
        word: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Expansion, ExpandError> {
        let mut chars: Vec<char> = word.chars().collect();
        // Go's text/scanner skips a byte-order mark at the very start.
        if chars.first() == Some(&'\u{feff}') {
            chars.remove(0);
        }
        // A word is never refused for its own text: only growth through variables counts.
        let max_chars = self.max_chars.max(chars.len());
        let mut sw = ShellWord {
            max_chars,
            max_work: self.max_work,
            work_left: self.max_work,
            chars,
            pos: 0,
            lex: *self,
            raw_escapes: self.raw_escapes,
            lookup,
            used: BTreeSet::new(),
            unset: BTreeSet::new(),
            depth: 0,
        };
        let raw = sw.raw_escapes;
        match sw.process_stop_on(None, raw) {
            Ok((value, words)) => Ok(Expansion {
                value,
                words,
                used: sw.used,
                unset: sw.unset,
            }),
            Err(reason) => Err(ExpandError {
                word: word.to_string(),
                reason,
            }),
        }
    }

    /// `ProcessWord`: one string, whitespace kept.
    pub fn process_word(
        &self,
        word: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<String, ExpandError> {
        self.expand(word, lookup).map(|e| e.value)
    }

    /// `ProcessWords`: split into words on unquoted whitespace.
    pub fn process_words(
        &self,
        word: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<String>, ExpandError> {
        self.expand(word, lookup).map(|e| e.words)
    }
}

/// Nesting limit for `${a:-${b:-${c...}}}` so hostile input cannot exhaust the stack.
const MAX_NESTING: usize = 200;

struct ShellWord<'a> {
    /// Longest value any part of this word may reach.
    max_chars: usize,
    /// The work budget and what is left of it (see [`MAX_EXPANSION_WORK`]).
    max_work: usize,
    work_left: usize,
    chars: Vec<char>,
    pos: usize,
    lex: Lexer,
    raw_escapes: bool,
    lookup: &'a dyn Fn(&str) -> Option<String>,
    used: BTreeSet<String>,
    unset: BTreeSet<String>,
    depth: usize,
}

#[derive(Default)]
struct Words {
    word: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, ch: char) {
        if ch.is_whitespace() && self.in_word {
            if !self.word.is_empty() {
                self.words.push(std::mem::take(&mut self.word));
                self.in_word = false;
            }
        } else if !ch.is_whitespace() {
            self.add_raw_char(ch);
        }
    }
    fn add_raw_char(&mut self, ch: char) {
        self.word.push(ch);
        self.in_word = true;
    }
    fn add_string(&mut self, s: &str) {
        for ch in s.chars() {
            self.add_char(ch);
        }
    }
    fn add_raw_string(&mut self, s: &str) {
        self.word.push_str(s);
        self.in_word = true;
    }
    fn finish(mut self) -> Vec<String> {
        if !self.word.is_empty() {
            self.words.push(std::mem::take(&mut self.word));
        }
        self.words
    }
}

type R<T> = Result<T, String>;

impl ShellWord<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }
    fn next(&mut self) -> Option<char> {
        let c = self.chars.get(self.pos).copied();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn get_env(&mut self, name: &str) -> R<Option<String>> {
        let v = (self.lookup)(name);
        match &v {
            Some(value) => {
                self.charge(value.len())?;
                self.used.insert(name.to_string());
            }
            None => {
                self.unset.insert(name.to_string());
            }
        }
        Ok(v)
    }

    /// Spends `units` of the word's work budget.
    fn charge(&mut self, units: usize) -> R<()> {
        match self.work_left.checked_sub(units) {
            Some(left) => {
                self.work_left = left;
                Ok(())
            }
            None => Err(format!(
                "expanding it takes more than {} steps (kiln's limit for one word: \
                 variables that repeat or replace long values multiply the work)",
                self.max_work
            )),
        }
    }

    /// Fails once a value being built grows past [`MAX_EXPANDED_CHARS`].
    fn check_len(&self, value: &str) -> R<()> {
        // Bytes bound characters from above; count characters only when bytes exceed.
        if value.len() > self.max_chars && value.chars().count() > self.max_chars {
            return Err(format!(
                "the value grows past {} characters (kiln's limit for one expanded word; \
                 a variable that repeats another on each line doubles in size every time)",
                self.max_chars
            ));
        }
        Ok(())
    }

    fn process_stop_on(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> R<(String, Vec<String>)> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err("too deeply nested substitution".to_string());
        }
        let saved = self.raw_escapes;
        self.raw_escapes = raw_escapes;
        let r = self.process_stop_on_inner(stop);
        self.raw_escapes = saved;
        self.depth -= 1;
        r
    }

    fn process_stop_on_inner(&mut self, stop: Option<char>) -> R<(String, Vec<String>)> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(ch) = self.peek() {
            if Some(ch) == stop {
                self.next();
                return Ok((result, words.finish()));
            }
            let special = match ch {
                '$' => Some(0),
                '<' => Some(1),
                '\'' if !self.lex.skip_process_quotes => Some(2),
                '"' if !self.lex.skip_process_quotes => Some(3),
                _ => None,
            };
            if let Some(kind) = special {
                let tmp = match kind {
                    0 => self.process_dollar()?,
                    1 => self.process_possible_heredoc(),
                    2 => self.process_single_quote()?,
                    _ => self.process_double_quote()?,
                };
                result.push_str(&tmp);
                self.check_len(&result)?;
                if ch == '$' {
                    words.add_string(&tmp);
                } else {
                    words.add_raw_string(&tmp);
                }
                continue;
            }
            let mut ch = self.next().unwrap_or_default();
            if ch == self.lex.escape {
                if self.raw_escapes {
                    words.add_raw_char(ch);
                    result.push(ch);
                }
                match self.next() {
                    None => break,
                    Some(c) => ch = c,
                }
                words.add_raw_char(ch);
            } else {
                words.add_char(ch);
            }
            result.push(ch);
        }
        if let Some(stop) = stop {
            return Err(format!(
                "unexpected end of statement while looking for matching {stop}"
            ));
        }
        Ok((result, words.finish()))
    }

    fn process_single_quote(&mut self) -> R<String> {
        let mut result = String::new();
        let open = self.next().unwrap_or('\'');
        if self.lex.raw_quotes {
            result.push(open);
        }
        loop {
            match self.next() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .to_string(),
                    )
                }
                Some('\'') => {
                    if self.lex.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(c) => result.push(c),
            }
        }
    }

    fn process_double_quote(&mut self) -> R<String> {
        let mut result = String::new();
        let open = self.next().unwrap_or('"');
        if self.lex.raw_quotes {
            result.push(open);
        }
        loop {
            match self.peek() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching double-quote"
                            .to_string(),
                    )
                }
                Some('"') => {
                    self.next();
                    if self.lex.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let v = self.process_dollar()?;
                    result.push_str(&v);
                    self.check_len(&result)?;
                }
                Some(_) => {
                    let mut ch = self.next().unwrap_or_default();
                    if ch == self.lex.escape {
                        if self.raw_escapes {
                            result.push(ch);
                        }
                        match self.peek() {
                            None => continue,
                            Some(c) if c == '"' || c == '$' || c == self.lex.escape => {
                                ch = c;
                                self.next();
                            }
                            Some(_) => {}
                        }
                    }
                    result.push(ch);
                }
            }
        }
    }

    fn process_dollar(&mut self) -> R<String> {
        self.next(); // '$'
        if self.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".to_string());
            }
            let value = self.get_env(&name)?;
            return Ok(match value {
                None if self.lex.skip_unset_env => format!("${name}"),
                v => v.unwrap_or_default(),
            });
        }
        self.next(); // '{'
        match self.peek() {
            None => return Err("syntax error: missing '}'".to_string()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".to_string()),
            _ => {}
        }
        let name = self.process_name();
        let Some(mut ch) = self.next() else {
            // Go's scanner returns EOF (-1), which falls to "unsupported modifier".
            return Err("syntax error: missing '}'".to_string());
        };
        let mut chs = ch.to_string();
        let mut null_is_unset = false;
        match ch {
            '}' => {
                let value = self.get_env(&name)?;
                Ok(match value {
                    None if self.lex.skip_unset_env => format!("${{{name}}}"),
                    v => v.unwrap_or_default(),
                })
            }
            '/' => self.process_dollar_replace(&name),
            ':' | '+' | '-' | '?' | '#' | '%' => {
                if ch == ':' {
                    null_is_unset = true;
                    match self.next() {
                        Some(c) => {
                            ch = c;
                            chs.push(c);
                        }
                        None => {
                            // Go appends the EOF rune (U+FFFD when printed) and fails later.
                            return Err("syntax error: missing '}'".to_string());
                        }
                    }
                }
                let raw = ch == '#' || ch == '%';
                if null_is_unset && raw {
                    return Err(format!("unsupported modifier ({chs}) in substitution"));
                }
                let word = match self.process_stop_on(Some('}'), raw) {
                    Ok((w, _)) => w,
                    Err(e) => {
                        if self.peek().is_none() && !e.starts_with("too deeply") {
                            return Err("syntax error: missing '}'".to_string());
                        }
                        return Err(e);
                    }
                };
                let found = self.get_env(&name)?;
                if found.is_none() && self.lex.skip_unset_env {
                    return Ok(format!("${{{name}{chs}{word}}}"));
                }
                let set = found.is_some();
                let value = found.unwrap_or_default();
                let empty_unset = !set || (null_is_unset && value.is_empty());
                match ch {
                    '-' => Ok(if empty_unset { word } else { value }),
                    '+' => Ok(if empty_unset { String::new() } else { word }),
                    '?' => {
                        if !set {
                            let m = if word.is_empty() {
                                "is not allowed to be unset".to_string()
                            } else {
                                word
                            };
                            return Err(format!("{name}: {m}"));
                        }
                        if null_is_unset && value.is_empty() {
                            let m = if word.is_empty() {
                                "is not allowed to be empty".to_string()
                            } else {
                                word
                            };
                            return Err(format!("{name}: {m}"));
                        }
                        Ok(value)
                    }
                    '#' | '%' => {
                        let (greedy, pattern) = match word.strip_prefix(ch) {
                            Some(p) => (true, p.to_string()),
                            None => (false, word),
                        };
                        if ch == '%' {
                            trim_suffix(&pattern, &value, greedy, &mut |n| self.charge(n))
                        } else {
                            trim_prefix(&pattern, &value, greedy, &mut |n| self.charge(n))
                        }
                    }
                    _ => Err(format!("unsupported modifier ({chs}) in substitution")),
                }
            }
            _ => Err(format!("unsupported modifier ({chs}) in substitution")),
        }
    }

    fn process_dollar_replace(&mut self, name: &str) -> R<String> {
        let all = self.peek() == Some('/');
        if all {
            self.next();
        }
        let pattern = match self.process_stop_on(Some('/'), true) {
            Ok((p, _)) => p,
            Err(e) => {
                if self.peek().is_none() && !e.starts_with("too deeply") {
                    return Err("syntax error: missing '/' in ${}".to_string());
                }
                return Err(e);
            }
        };
        let replacement = match self.process_stop_on(Some('}'), true) {
            Ok((p, _)) => p,
            Err(e) => {
                if self.peek().is_none() && !e.starts_with("too deeply") {
                    return Err("syntax error: missing '}'".to_string());
                }
                return Err(e);
            }
        };
        let value = match self.get_env(name)? {
            Some(v) => v,
            None if self.lex.skip_unset_env => {
                return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
            }
            None => String::new(),
        };
        let pat = compile_pattern(&pattern)
            .map_err(|e| format!("invalid pattern ({pattern}) in substitution: {e}"))?;
        let out = replace(&pat, &value, &replacement, all, &mut |n| self.charge(n))?;
        self.check_len(&out)?;
        Ok(out)
    }

    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && is_digit(ch) {
                while let Some(d) = self.peek() {
                    if !is_digit(d) {
                        break;
                    }
                    name.push(d);
                    self.next();
                }
                return name;
            }
            if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.next();
                return ch.to_string();
            }
            if !is_letter(ch) && !is_digit(ch) && ch != '_' {
                break;
            }
            name.push(ch);
            self.next();
        }
        name
    }

    fn process_possible_heredoc(&mut self) -> String {
        self.next(); // '<'
        if self.peek() != Some('<') {
            return "<".to_string();
        }
        self.next();
        let mut out = "<<".to_string();
        while let Some(c @ ('\t' | '\r' | ' ')) = self.peek() {
            out.push(c);
            self.next();
        }
        out
    }
}

/// Go's `unicode.IsDigit` (decimal digits).
fn is_digit(c: char) -> bool {
    c.is_ascii_digit() || is_unicode_decimal(c)
}

/// Approximation of Unicode category Nd for non-ASCII characters: Rust's std has no
/// category tables, so only the common decimal-digit blocks are recognised.
fn is_unicode_decimal(c: char) -> bool {
    const BLOCKS: [u32; 12] = [
        0x0660, 0x06F0, 0x07C0, 0x0966, 0x09E6, 0x0A66, 0x0AE6, 0x0B66, 0x0BE6, 0x0C66, 0x0CE6,
        0xFF10,
    ];
    let u = c as u32;
    BLOCKS.iter().any(|&b| (b..b + 10).contains(&u))
}

/// Go's `unicode.IsLetter`.
fn is_letter(c: char) -> bool {
    c.is_alphabetic() && !c.is_numeric()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Star,
    Any,
    Lit(char),
}

/// Compiles a `${V#pattern}` pattern: `*`, `?`, `\*`, `\?`, `\\`; `\}` and `\/` are literal.
fn compile_pattern(pattern: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' => out.push(Tok::Star),
            '?' => out.push(Tok::Any),
            '\\' => match chars.get(i) {
                Some('}') | Some('/') => continue,
                Some(&n @ ('*' | '?' | '\\')) => {
                    out.push(Tok::Lit(n));
                    i += 1;
                }
                Some(&n) => return Err(format!("invalid escape '\\{n}'")),
                None => return Err("invalid escape '\\%!c(int32=-1)'".to_string()),
            },
            c => out.push(Tok::Lit(c)),
        }
    }
    Ok(out)
}

/// The end of the match of `pat` anchored at `start` of `s`, with regex priority semantics
/// (stars greedy or lazy), computed by dynamic programming (no exponential backtracking).
/// `charge` is told the steps the match will take before it starts.
fn match_at(
    pat: &[Tok],
    s: &[char],
    start: usize,
    greedy: bool,
    charge: &mut dyn FnMut(usize) -> R<()>,
) -> R<Option<usize>> {
    let n = s.len();
    charge((pat.len() + 1).saturating_mul(n.saturating_sub(start) + 1))?;
    // next[j]: result of matching pat[k+1..] at position j.
    let mut next: Vec<Option<usize>> = (0..=n).map(Some).collect();
    for tok in pat.iter().rev() {
        let mut cur: Vec<Option<usize>> = vec![None; n + 1];
        match tok {
            Tok::Lit(c) => {
                for j in start..n {
                    if s[j] == *c {
                        cur[j] = next[j + 1];
                    }
                }
            }
            Tok::Any => {
                for j in start..n {
                    if s[j] != '\n' {
                        cur[j] = next[j + 1];
                    }
                }
            }
            Tok::Star => {
                // `.` does not match a newline in Go regexps.
                let mut acc: Option<usize> = None;
                if greedy {
                    // Longest first: the best is from the furthest reachable position.
                    for j in (start..=n).rev() {
                        if j < n && s[j] == '\n' {
                            acc = None;
                        }
                        if acc.is_none() {
                            acc = next[j];
                        }
                        cur[j] = acc;
                    }
                } else {
                    for j in (start..=n).rev() {
                        if j < n && s[j] == '\n' {
                            acc = None;
                        }
                        acc = next[j].or(acc);
                        cur[j] = acc;
                    }
                }
            }
        }
        next = cur;
    }
    Ok(next.get(start).copied().flatten())
}

fn trim_prefix(
    pattern: &str,
    value: &str,
    greedy: bool,
    charge: &mut dyn FnMut(usize) -> R<()>,
) -> R<String> {
    let pat = compile_pattern(pattern)
        .map_err(|e| format!("invalid pattern ({pattern}) in substitution: {e}"))?;
    let s: Vec<char> = value.chars().collect();
    Ok(match match_at(&pat, &s, 0, greedy, charge)? {
        Some(end) => s[end..].iter().collect(),
        None => value.to_string(),
    })
}

/// Reverses a pattern keeping `\x` escapes in front of their character.
fn reverse_pattern(pattern: &str) -> String {
    let p: Vec<char> = pattern.chars().collect();
    let mut out = vec!['\0'; p.len()];
    let last = p.len().saturating_sub(1);
    let mut i = 0;
    while i < p.len() {
        let t = p[i];
        let o = last - i;
        if t == '\\' && i != last {
            out[o - 1] = t;
            out[o] = p[i + 1];
            i += 2;
        } else {
            out[o] = t;
            i += 1;
        }
    }
    out.into_iter().collect()
}

fn trim_suffix(
    pattern: &str,
    value: &str,
    greedy: bool,
    charge: &mut dyn FnMut(usize) -> R<()>,
) -> R<String> {
    let rp = reverse_pattern(pattern);
    let rv: String = value.chars().rev().collect();
    let r = trim_prefix(&rp, &rv, greedy, charge)?;
    Ok(r.chars().rev().collect())
}

/// Go's `Regexp.ReplaceAllString` / first-match replacement with a literal replacement.
/// Every match attempt and every replacement written is charged to `charge`.
fn replace(
    pat: &[Tok],
    value: &str,
    replacement: &str,
    all: bool,
    charge: &mut dyn FnMut(usize) -> R<()>,
) -> R<String> {
    let s: Vec<char> = value.chars().collect();
    // A match can only start where its first literal character is.
    let first = match pat.first() {
        Some(Tok::Lit(c)) => Some(*c),
        _ => None,
    };
    let find = |from: usize, charge: &mut dyn FnMut(usize) -> R<()>| -> R<Option<(usize, usize)>> {
        for st in from..=s.len() {
            if first.is_some_and(|c| s.get(st) != Some(&c)) {
                continue;
            }
            if let Some(e) = match_at(pat, &s, st, true, charge)? {
                return Ok(Some((st, e)));
            }
        }
        Ok(None)
    };
    if !all {
        return Ok(match find(0, charge)? {
            Some((a, b)) => {
                let mut out: String = s[..a].iter().collect();
                out.push_str(replacement);
                out.extend(&s[b..]);
                out
            }
            None => value.to_string(),
        });
    }
    let mut out = String::new();
    let mut last_end = 0;
    let mut search = 0;
    while search <= s.len() {
        let Some((a, b)) = find(search, charge)? else {
            break;
        };
        out.extend(&s[last_end..a]);
        if b > last_end || a == 0 {
            charge(replacement.len())?;
            out.push_str(replacement);
        }
        last_end = b;
        if search + 1 > b {
            search += 1;
        } else {
            search = b;
        }
    }
    if last_end <= s.len() {
        out.extend(&s[last_end..]);
    }
    Ok(out)
}

/// Go's `%q` / `strconv.Quote`, used in BuildKit messages.
pub(crate) fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() || c == '\u{feff}' => {
                if (c as u32) < 0x10000 {
                    out.push_str(&format!("\\u{:04x}", c as u32));
                } else {
                    out.push_str(&format!("\\U{:08x}", c as u32));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |n| {
            vars.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn expands_all_modifiers_like_buildkit() {
        let e = env(&[("A", "hello.tar.gz"), ("E", ""), ("P", "/usr/local/bin")]);
        let l = Lexer::new('\\');
        let w = |s: &str| l.process_word(s, &e).unwrap();
        assert_eq!(w("$A"), "hello.tar.gz");
        assert_eq!(w("${A}x"), "hello.tar.gzx");
        assert_eq!(w("${U:-def}"), "def");
        assert_eq!(w("${E:-def}"), "def");
        assert_eq!(w("${E-def}"), "");
        assert_eq!(w("${A:+alt}"), "alt");
        assert_eq!(w("${E+alt}"), "alt");
        assert_eq!(w("${E:+alt}"), "");
        assert_eq!(w("${A#*.}"), "tar.gz");
        assert_eq!(w("${A##*.}"), "gz");
        assert_eq!(w("${A%.*}"), "hello.tar");
        assert_eq!(w("${A%%.*}"), "hello");
        assert_eq!(w("${P/local/opt}"), "/usr/opt/bin");
        assert_eq!(w("${P//\\//:}"), ":usr:local:bin");
        assert_eq!(w("'$A'"), "$A");
        assert_eq!(w("\"$A\""), "hello.tar.gz");
        assert_eq!(w("\\$A"), "$A");
        assert!(l.process_word("${U:?need U}", &e).is_err());
        assert_eq!(
            l.process_word("${U?}", &e).unwrap_err().to_string(),
            "failed to process \"${U?}\": U: is not allowed to be unset"
        );
    }

    #[test]
    fn words_split_on_whitespace_from_variables_but_not_in_quotes() {
        let e = env(&[("X", "a b")]);
        let l = Lexer::new('\\');
        assert_eq!(
            l.process_words("$X \"c d\"", &e).unwrap(),
            vec!["a", "b", "c d"]
        );
    }

    #[test]
    fn reports_used_and_unset_variables() {
        let e = env(&[("X", "1")]);
        let r = Lexer::new('\\').expand("$X ${Y:-2}", &e).unwrap();
        assert!(r.used.contains("X"));
        assert!(r.unset.contains("Y"));
    }

    #[test]
    fn a_value_that_doubles_past_the_cap_is_an_error() {
        let half = "x".repeat(MAX_EXPANDED_CHARS / 2 + 1);
        let vars = [("V", half.as_str())];
        let e = env(&vars);
        let l = Lexer::new('\\');
        assert_eq!(l.process_word("$V", &e).unwrap().len(), half.len());
        let err = l.process_word("${V}${V}", &e).unwrap_err();
        assert!(err.reason.contains("grows past"), "{err}");
        let err = l.process_word("\"$V$V\"", &e).unwrap_err();
        assert!(err.reason.contains("grows past"), "{err}");
    }

    #[test]
    fn a_literal_word_longer_than_the_cap_is_kept() {
        let long = "y".repeat(MAX_EXPANDED_CHARS + 10);
        let out = Lexer::new('\\').process_word(&long, &|_| None).unwrap();
        assert_eq!(out.len(), long.len());
    }

    #[test]
    fn quadratic_pattern_replacement_is_bounded() {
        let long = "a".repeat(200_000);
        let vars = [("V", long.as_str())];
        let e = env(&vars);
        let l = Lexer::new('\\');
        // A literal pattern that never matches is cheap.
        assert_eq!(l.process_word("${V//b/c}", &e).unwrap().len(), 200_000);
        let err = l.process_word("${V//?/xx}", &e).unwrap_err();
        assert!(err.reason.contains("steps"), "{err}");
    }

    #[test]
    fn repeated_lookups_of_a_long_value_are_bounded() {
        let long = "z".repeat(1 << 20);
        let vars = [("V", long.as_str())];
        let e = env(&vars);
        let word = "${V:+.}".repeat(100);
        let err = Lexer::new('\\').process_word(&word, &e).unwrap_err();
        assert!(err.reason.contains("steps"), "{err}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let s = "${a:-".repeat(100_000);
        assert!(Lexer::new('\\').process_word(&s, &|_| None).is_err());
    }
}
