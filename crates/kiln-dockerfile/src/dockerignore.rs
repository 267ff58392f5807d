//! `.dockerignore` parsing and matching with Docker's semantics: lines starting with `#` are
//! comments, surrounding whitespace is trimmed, `!` re-includes, patterns are cleaned like Go's
//! `filepath.Clean` and a leading `/` is dropped; `*` and `?` do not cross `/`, `**` matches any
//! number of directories, `[...]` classes and `\` escapes work as in Go's `filepath.Match`.
//! A path is excluded when the last matching pattern says so, where a pattern that matched
//! a parent directory also matches everything below it (BuildKit's parent-results rule).

/// An invalid pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid .dockerignore pattern {pattern:?} on line {line}: {reason}")]
pub struct IgnoreError {
    /// The pattern as written.
    pub pattern: String,
    /// 1-based line in the file (or index + 1 in the pattern list).
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(char),
    /// `?`: one character except `/`.
    One,
    /// `*`: any run without `/`.
    Star,
    /// `**/` or `**` inside: `(.*/)?`.
    AnyDirs,
    /// Trailing `**` after something else: `.*`.
    AnyRest,
    /// `[...]`.
    Class {
        negated: bool,
        items: Vec<(char, char)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Exact,
    Prefix(String),
    Suffix(String),
    Glob(Vec<Tok>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    cleaned: String,
    exclusion: bool,
    kind: Kind,
}

/// A compiled `.dockerignore`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IgnoreMatcher {
    patterns: Vec<Pattern>,
}

impl IgnoreMatcher {
    /// Parses the text of a `.dockerignore` file.
    pub fn parse(text: &str) -> Result<Self, IgnoreError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let lines: Vec<&str> = text.lines().collect();
        Self::from_patterns(&lines)
    }

    /// Compiles patterns given one per element (comments and blanks are skipped).
    pub fn from_patterns<S: AsRef<str>>(patterns: &[S]) -> Result<Self, IgnoreError> {
        let mut out = Vec::new();
        for (i, original) in patterns.iter().enumerate() {
            let original = original.as_ref();
            if original.starts_with('#') {
                continue;
            }
            let mut p = original.trim();
            if p.is_empty() {
                continue;
            }
            let err = |reason: &str| IgnoreError {
                pattern: original.to_string(),
                line: i + 1,
                reason: reason.to_string(),
            };
            let exclusion = p.starts_with('!');
            if exclusion {
                p = p[1..].trim();
                if p.is_empty() {
                    return Err(err("illegal exclusion pattern: \"!\""));
                }
            }
            let mut cleaned = clean_path(p);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            validate(&cleaned).map_err(|_| err("syntax error in pattern"))?;
            let kind = compile(&cleaned);
            out.push(Pattern {
                cleaned,
                exclusion,
                kind,
            });
        }
        Ok(IgnoreMatcher { patterns: out })
    }

    /// The cleaned patterns, `!`-prefixed for exclusions.
    pub fn patterns(&self) -> Vec<String> {
        self.patterns
            .iter()
            .map(|p| format!("{}{}", if p.exclusion { "!" } else { "" }, p.cleaned))
            .collect()
    }

    /// True when there are no patterns.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `path` (slash-separated, relative to the context root) is excluded.
    pub fn matches(&self, path: &str) -> bool {
        let segments: Vec<&str> = path.split('/').collect();
        let mut parent: Vec<bool> = Vec::new();
        let mut matched = false;
        for depth in 1..=segments.len() {
            let current = segments[..depth].join("/");
            let mut now = Vec::with_capacity(self.patterns.len());
            matched = false;
            for (i, p) in self.patterns.iter().enumerate() {
                let mut m = parent.get(i).copied().unwrap_or(false);
                if !m {
                    // An inclusion cannot change an excluded path and vice versa.
                    if p.exclusion != matched {
                        now.push(false);
                        continue;
                    }
                    m = p.matches(&current);
                }
                now.push(m);
                if m {
                    matched = !p.exclusion;
                }
            }
            parent = now;
        }
        matched
    }

    /// Whether a `!` pattern could re-include something under the directory `dir`, in which
    /// case an excluded directory must still be walked.
    pub fn may_match_under(&self, dir: &str) -> bool {
        let segs: Vec<&str> = dir.split('/').collect();
        self.patterns.iter().filter(|p| p.exclusion).any(|p| {
            let dirs: Vec<&str> = p.cleaned.split('/').collect();
            for (i, s) in segs.iter().enumerate() {
                let Some(pd) = dirs.get(i) else { return false };
                if pd.contains("**") {
                    return true;
                }
                let wild = pd.contains(['*', '?', '[', '\\']);
                if !wild && pd != s {
                    return false;
                }
            }
            dirs.len() > segs.len()
        })
    }
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        match &self.kind {
            Kind::Exact => path == self.cleaned,
            Kind::Prefix(p) => path.starts_with(p.as_str()),
            Kind::Suffix(s) => {
                path.ends_with(s.as_str()) || (s.starts_with('/') && path == &s[1..])
            }
            Kind::Glob(toks) => {
                let chars: Vec<char> = path.chars().collect();
                glob_match(toks, &chars)
            }
        }
    }
}

/// Go's `filepath.Clean` for slash-separated paths.
pub fn clean_path(p: &str) -> String {
    if p.is_empty() {
        return ".".to_string();
    }
    let rooted = p.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|l| *l != "..") {
                    out.pop();
                } else if !rooted {
                    out.push("..");
                }
            }
            x => out.push(x),
        }
    }
    let body = out.join("/");
    match (rooted, body.is_empty()) {
        (true, _) => format!("/{body}"),
        (false, true) => ".".to_string(),
        (false, false) => body,
    }
}

/// Rejects what Go's `filepath.Match` rejects: unclosed or empty classes, bad ranges,
/// a trailing escape.
fn validate(p: &str) -> Result<(), ()> {
    let c: Vec<char> = p.chars().collect();
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '\\' => {
                if i + 1 >= c.len() {
                    return Err(());
                }
                i += 2;
            }
            '[' => {
                i += 1;
                if c.get(i) == Some(&'^') {
                    i += 1;
                }
                let mut n = 0;
                loop {
                    match c.get(i) {
                        None => return Err(()),
                        Some(']') if n > 0 => {
                            i += 1;
                            break;
                        }
                        _ => {}
                    }
                    let lo = class_char(&c, &mut i)?;
                    if c.get(i) == Some(&'-') {
                        i += 1;
                        let hi = class_char(&c, &mut i)?;
                        if hi < lo {
                            return Err(());
                        }
                    }
                    n += 1;
                }
            }
            _ => i += 1,
        }
    }
    Ok(())
}

fn class_char(c: &[char], i: &mut usize) -> Result<char, ()> {
    match c.get(*i) {
        None | Some('-') | Some(']') => Err(()),
        Some('\\') => {
            let ch = *c.get(*i + 1).ok_or(())?;
            *i += 2;
            Ok(ch)
        }
        Some(&ch) => {
            *i += 1;
            Ok(ch)
        }
    }
}

fn compile(p: &str) -> Kind {
    let c: Vec<char> = p.chars().collect();
    let mut toks = Vec::new();
    let mut exact = true;
    let mut kind_prefix = false;
    let mut kind_suffix = false;
    let mut i = 0;
    while i < c.len() {
        let first = i == 0;
        let ch = c[i];
        i += 1;
        match ch {
            '*' => {
                if c.get(i) == Some(&'*') {
                    i += 1;
                    if c.get(i) == Some(&'/') {
                        i += 1;
                    }
                    if i >= c.len() {
                        if exact && !kind_suffix {
                            kind_prefix = true;
                        } else {
                            exact = false;
                            kind_prefix = false;
                        }
                        toks.push(Tok::AnyRest);
                    } else {
                        exact = false;
                        kind_prefix = false;
                        toks.push(Tok::AnyDirs);
                    }
                    if first {
                        kind_suffix = true;
                    }
                } else {
                    exact = false;
                    kind_prefix = false;
                    kind_suffix = false;
                    toks.push(Tok::Star);
                }
            }
            '?' => {
                exact = false;
                kind_prefix = false;
                kind_suffix = false;
                toks.push(Tok::One);
            }
            '\\' => {
                if let Some(&n) = c.get(i) {
                    i += 1;
                    exact = false;
                    kind_prefix = false;
                    kind_suffix = false;
                    toks.push(Tok::Lit(n));
                } else {
                    toks.push(Tok::Lit('\\'));
                }
            }
            '[' => {
                exact = false;
                kind_prefix = false;
                kind_suffix = false;
                let mut negated = false;
                if c.get(i) == Some(&'^') {
                    negated = true;
                    i += 1;
                }
                let mut items = Vec::new();
                let mut first_item = true;
                while i < c.len() && (c[i] != ']' || first_item) {
                    first_item = false;
                    let mut lo = c[i];
                    if lo == '\\' && i + 1 < c.len() {
                        i += 1;
                        lo = c[i];
                    }
                    i += 1;
                    let mut hi = lo;
                    if i + 1 < c.len() && c[i] == '-' && c[i + 1] != ']' {
                        i += 1;
                        hi = c[i];
                        if hi == '\\' && i + 1 < c.len() {
                            i += 1;
                            hi = c[i];
                        }
                        i += 1;
                    }
                    items.push((lo, hi));
                }
                i += 1; // ']'
                toks.push(Tok::Class { negated, items });
            }
            ']' => {
                exact = false;
                kind_prefix = false;
                kind_suffix = false;
                toks.push(Tok::Lit(']'));
            }
            other => toks.push(Tok::Lit(other)),
        }
    }
    // Docker's fast paths: `**` first → suffix, `**` last only → prefix.
    if kind_suffix
        && toks.iter().skip(1).all(|t| matches!(t, Tok::Lit(_)))
        && matches!(toks.first(), Some(Tok::AnyDirs | Tok::AnyRest))
    {
        if toks.len() > 1 || p.len() > 2 {
            return Kind::Suffix(p[2..].to_string());
        }
        return Kind::Suffix(String::new());
    }
    if kind_prefix && exact {
        return Kind::Prefix(p[..p.len() - 2].to_string());
    }
    if exact && toks.iter().all(|t| matches!(t, Tok::Lit(_))) {
        return Kind::Exact;
    }
    Kind::Glob(toks)
}

/// Anchored match of the token list against the whole path (memoised, no blow-up).
fn glob_match(toks: &[Tok], s: &[char]) -> bool {
    let n = s.len();
    // ok[j] for the suffix of tokens starting at k: can toks[k..] match s[j..] to the end?
    let mut next: Vec<bool> = (0..=n).map(|j| j == n).collect();
    for t in toks.iter().rev() {
        let mut cur = vec![false; n + 1];
        for j in (0..=n).rev() {
            cur[j] = match t {
                Tok::Lit(c) => j < n && s[j] == *c && next[j + 1],
                Tok::One => j < n && s[j] != '/' && next[j + 1],
                Tok::Class { negated, items } => {
                    j < n && {
                        let inside = items.iter().any(|(lo, hi)| *lo <= s[j] && s[j] <= *hi);
                        inside != *negated && next[j + 1]
                    }
                }
                Tok::Star => next[j] || (j < n && s[j] != '/' && cur[j + 1]),
                Tok::AnyRest => next[j] || (j < n && cur[j + 1]),
                Tok::AnyDirs => {
                    // (.*/)? : empty, or any run ending with '/'.
                    next[j] || (j..n).any(|k| s[k] == '/' && next[k + 1])
                }
            };
        }
        next = cur;
    }
    next[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_directory_match_excludes_children_and_exceptions_reinclude() {
        let m =
            IgnoreMatcher::parse("# comment\nnode_modules\n*.log\n!keep.log\n/build/\n**/tmp\n")
                .unwrap();
        assert!(m.matches("node_modules"));
        assert!(m.matches("node_modules/x/y.js"));
        assert!(m.matches("a.log"));
        assert!(!m.matches("keep.log"));
        assert!(!m.matches("dir/a.log"));
        assert!(m.matches("build/out.o"));
        assert!(m.matches("a/b/tmp/c"));
        assert!(m.matches("tmp"));
        assert!(!m.matches("src/main.rs"));
    }

    #[test]
    fn patterns_are_cleaned_like_filepath_clean() {
        let m = IgnoreMatcher::parse("./a/../b//c/\n!/d/./e\n").unwrap();
        assert_eq!(m.patterns(), vec!["b/c", "!d/e"]);
    }

    #[test]
    fn bad_patterns_are_errors() {
        assert!(IgnoreMatcher::parse("[a").is_err());
        assert!(IgnoreMatcher::parse("!").is_err());
        assert!(IgnoreMatcher::parse("a\\").is_err());
    }
}
