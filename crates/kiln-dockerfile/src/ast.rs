//! The Dockerfile syntax tree: what BuildKit's parser produces, with line/column spans.
//!
//! The tree is raw: instruction arguments keep quotes and variables as written. The typed
//! view (validated flags, parsed `--mount` options, ...) is in [`crate::instructions`].

use serde::Serialize;

/// A place in the source: 1-based line and 1-based column counted in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
pub struct Position {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column, in characters (not bytes).
    pub column: usize,
}

/// A range of source text; `end` is exclusive and may be on a later line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub struct Span {
    /// First character.
    pub start: Position,
    /// One past the last character.
    pub end: Position,
}

impl Span {
    /// A span from `start` to `end`.
    pub fn new(start: Position, end: Position) -> Self {
        Span { start, end }
    }
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dockerfile {
    /// Parser directives (`# syntax=`, `# escape=`, `# check=`) from the top of the file.
    pub directives: Vec<Directive>,
    /// The active escape character: `\` unless `# escape=` set a backtick.
    pub escape: char,
    /// Instructions in source order.
    pub instructions: Vec<Instruction>,
    /// Non-fatal findings of the parser (empty continuation lines).
    pub warnings: Vec<ParseWarning>,
}

impl Dockerfile {
    /// The value of a directive by lower-case name (`syntax`, `escape`, `check`).
    pub fn directive(&self, name: &str) -> Option<&Directive> {
        self.directives.iter().find(|d| d.name == name)
    }
}

/// One parser directive line such as `# syntax=docker/dockerfile:1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Directive {
    /// Lower-cased name: `syntax`, `escape` or `check`.
    pub name: String,
    /// The value with surrounding whitespace removed.
    pub value: String,
    /// Where the directive line is.
    pub span: Span,
}

/// A non-fatal parser finding, e.g. an empty line inside a continuation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParseWarning {
    /// What was found (BuildKit's wording).
    pub message: String,
    /// Where.
    pub span: Span,
}

/// The instructions BuildKit knows. Anything else parses (as BuildKit's parser does) but is
/// rejected by [`crate::instructions::lower`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[allow(missing_docs)]
pub enum Keyword {
    Add,
    Arg,
    Cmd,
    Copy,
    Entrypoint,
    Env,
    Expose,
    From,
    Healthcheck,
    Label,
    Maintainer,
    Onbuild,
    Run,
    Shell,
    Stopsignal,
    User,
    Volume,
    Workdir,
}

impl Keyword {
    /// All keywords.
    pub const ALL: [Keyword; 18] = [
        Keyword::Add,
        Keyword::Arg,
        Keyword::Cmd,
        Keyword::Copy,
        Keyword::Entrypoint,
        Keyword::Env,
        Keyword::Expose,
        Keyword::From,
        Keyword::Healthcheck,
        Keyword::Label,
        Keyword::Maintainer,
        Keyword::Onbuild,
        Keyword::Run,
        Keyword::Shell,
        Keyword::Stopsignal,
        Keyword::User,
        Keyword::Volume,
        Keyword::Workdir,
    ];

    /// The keyword spelled in upper case, e.g. `"RUN"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Keyword::Add => "ADD",
            Keyword::Arg => "ARG",
            Keyword::Cmd => "CMD",
            Keyword::Copy => "COPY",
            Keyword::Entrypoint => "ENTRYPOINT",
            Keyword::Env => "ENV",
            Keyword::Expose => "EXPOSE",
            Keyword::From => "FROM",
            Keyword::Healthcheck => "HEALTHCHECK",
            Keyword::Label => "LABEL",
            Keyword::Maintainer => "MAINTAINER",
            Keyword::Onbuild => "ONBUILD",
            Keyword::Run => "RUN",
            Keyword::Shell => "SHELL",
            Keyword::Stopsignal => "STOPSIGNAL",
            Keyword::User => "USER",
            Keyword::Volume => "VOLUME",
            Keyword::Workdir => "WORKDIR",
        }
    }

    /// Case-insensitive lookup of a keyword as written.
    pub fn parse(word: &str) -> Option<Keyword> {
        Keyword::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(word))
    }

    /// BuildKit's error for a word that is not a keyword: `unknown instruction: CP (did you
    /// mean CMD?)`. It suggests the first keyword (in [`Keyword::ALL`] order; BuildKit's order
    /// varies between runs) within edit distance 2, ignoring case, spelled in the word's case.
    pub fn unknown_message(word: &str) -> String {
        let lower = word.to_ascii_lowercase();
        let mut best: Option<(usize, Keyword)> = None;
        for k in Keyword::ALL {
            let d = edit_distance(&lower, &k.as_str().to_ascii_lowercase());
            if d < 3 && best.is_none_or(|(b, _)| d < b) {
                best = Some((d, k));
            }
        }
        match best {
            Some((_, k)) => {
                let shown = if word.chars().any(|c| c.is_ascii_lowercase()) {
                    k.as_str().to_ascii_lowercase()
                } else {
                    k.as_str().to_owned()
                };
                format!("unknown instruction: {word} (did you mean {shown}?)")
            }
            None => format!("unknown instruction: {word}"),
        }
    }
}

/// Levenshtein distance between two strings, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// One instruction, continuation lines joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instruction {
    /// The keyword as written (`run`, `Run`, `RUN`, or an unknown word).
    pub keyword: String,
    /// The logical line: physical lines joined with continuation characters, comment and
    /// empty lines removed (BuildKit's `Node.Original`). Heredoc bodies are not included.
    pub original: String,
    /// `--name[=value]` flags before the arguments.
    pub flags: Vec<Flag>,
    /// The arguments, split the way BuildKit's parser splits them for this instruction.
    pub args: Args,
    /// Heredoc bodies that follow the instruction, in order of their `<<` markers.
    pub heredocs: Vec<Heredoc>,
    /// Comment lines directly before the instruction (without `#`), e.g. stage descriptions.
    pub comments: Vec<String>,
    /// From the keyword to the end of the last line (heredoc terminators included).
    pub span: Span,
}

impl Instruction {
    /// The known keyword, or `None` for a word BuildKit does not know.
    pub fn kind(&self) -> Option<Keyword> {
        Keyword::parse(&self.keyword)
    }

    /// The keyword in upper case, e.g. `"RUN"` for `run`.
    pub fn name(&self) -> String {
        self.keyword.to_uppercase()
    }

    /// True when the arguments are in JSON (exec) form.
    pub fn is_json(&self) -> bool {
        match &self.args {
            Args::Json(_) => true,
            Args::Healthcheck { command, .. } => matches!(**command, Args::Json(_)),
            _ => false,
        }
    }
}

/// A builder flag such as `--mount=type=cache,target=/root/.cache` or `--link`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flag {
    /// The name without dashes (`mount`).
    pub name: String,
    /// The text after `=`, quotes and escapes removed; `None` for `--link`.
    pub value: Option<String>,
    /// Where the flag is written.
    pub span: Span,
}

impl Flag {
    /// The flag as BuildKit's parser reports it: `--name=value` or `--name`.
    pub fn text(&self) -> String {
        match &self.value {
            Some(v) => format!("--{}={}", self.name, v),
            None => format!("--{}", self.name),
        }
    }
}

/// A piece of argument text with its span.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Word {
    /// The text as written (quotes, escapes and variables kept).
    pub text: String,
    /// Where it is.
    pub span: Span,
}

/// `KEY=value` or legacy `KEY value` of ENV and LABEL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyValue {
    /// The name as written (quotes kept).
    pub key: Word,
    /// The value as written (quotes kept).
    pub value: Word,
    /// True for the legacy `ENV KEY value` form (no `=`).
    pub legacy: bool,
}

/// Arguments of an instruction, in the shape BuildKit's parser gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Args {
    /// No arguments (or an unknown instruction, whose arguments BuildKit ignores).
    Empty,
    /// One string: shell form of RUN/CMD/ENTRYPOINT/SHELL, and USER, WORKDIR, STOPSIGNAL,
    /// MAINTAINER.
    Text(Word),
    /// Words split on whitespace (FROM, EXPOSE, shell-form ADD/COPY/VOLUME) or, for ARG,
    /// split with quotes respected.
    Words(Vec<Word>),
    /// JSON (exec) form: the decoded strings.
    Json(JsonArgs),
    /// ENV and LABEL pairs.
    KeyValues(Vec<KeyValue>),
    /// HEALTHCHECK: the type word (`CMD`, `NONE`, ...) and the command after it.
    Healthcheck {
        /// `CMD` or `NONE` as written.
        kind: Word,
        /// The command (`Empty`, `Text` or `Json`).
        command: Box<Args>,
    },
    /// ONBUILD: the instruction it wraps.
    Onbuild(Box<Instruction>),
}

/// Decoded JSON-array arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JsonArgs {
    /// The strings of the array.
    pub values: Vec<String>,
    /// Where the array is written.
    pub span: Span,
}

/// A heredoc body (`<<EOF` ... `EOF`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Heredoc {
    /// The terminator word with quotes removed.
    pub name: String,
    /// Body lines exactly as in the file, each with its newline (tabs not yet stripped).
    pub content: String,
    /// `<<-`: leading tabs are stripped from body lines (see [`Heredoc::body`]).
    pub chomp: bool,
    /// False when the terminator was quoted: the body is not variable-expanded.
    pub expand: bool,
    /// File descriptor before `<<` (`3<<EOF`), 0 when absent.
    pub fd: u64,
    /// The body and terminator lines.
    pub span: Span,
}

impl Heredoc {
    /// The body with `<<-` tab stripping applied.
    pub fn body(&self) -> String {
        if !self.chomp {
            return self.content.clone();
        }
        chomp_heredoc_content(&self.content)
    }
}

/// Strips leading tabs from every line, as `<<-` asks.
pub fn chomp_heredoc_content(content: &str) -> String {
    content
        .split_inclusive('\n')
        .map(|l| l.trim_start_matches('\t'))
        .collect()
}
