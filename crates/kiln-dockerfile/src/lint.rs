//! Lint checks (`kiln build --call check`): BuildKit's Dockerfile rules, by the same names and
//! trigger conditions, honouring the `# check=skip=...;error=true` directive.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::ast::{Args, Dockerfile, Instruction, Keyword, Span};
use crate::dockerignore::{clean_path, IgnoreMatcher};
use crate::shell::Lexer;

/// One rule: its name, a one-line description and its documentation URL slug.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// BuildKit's rule name, e.g. `StageNameCasing`.
    pub name: &'static str,
    /// What the rule is about.
    pub description: &'static str,
    /// Documentation slug (`https://docs.docker.com/go/dockerfile/rule/<slug>/`).
    pub slug: &'static str,
}

impl Rule {
    /// The rule's documentation URL.
    pub fn url(&self) -> String {
        format!("https://docs.docker.com/go/dockerfile/rule/{}/", self.slug)
    }
}

macro_rules! rules {
    ($($id:ident = $name:literal, $slug:literal, $desc:literal;)*) => {
        $(
            #[doc = $desc]
            pub const $id: Rule = Rule { name: $name, description: $desc, slug: $slug };
        )*
        /// Every rule kiln checks.
        pub const ALL_RULES: &[Rule] = &[$($id),*];
    };
}

rules! {
    STAGE_NAME_CASING = "StageNameCasing", "stage-name-casing", "Stage names should be lowercase";
    FROM_AS_CASING = "FromAsCasing", "from-as-casing", "The 'as' keyword should match the case of the 'from' keyword";
    DUPLICATE_STAGE_NAME = "DuplicateStageName", "duplicate-stage-name", "Stage names should be unique";
    RESERVED_STAGE_NAME = "ReservedStageName", "reserved-stage-name", "Reserved words should not be used as stage names";
    JSON_ARGS_RECOMMENDED = "JSONArgsRecommended", "json-args-recommended", "JSON arguments recommended for ENTRYPOINT/CMD to prevent unintended behavior related to OS signals";
    MAINTAINER_DEPRECATED = "MaintainerDeprecated", "maintainer-deprecated", "The MAINTAINER instruction is deprecated, use a label instead to define an image author";
    UNDEFINED_ARG_IN_FROM = "UndefinedArgInFrom", "undefined-arg-in-from", "FROM command must use declared ARGs";
    WORKDIR_RELATIVE_PATH = "WorkdirRelativePath", "workdir-relative-path", "Relative workdir without an absolute workdir declared within the build can have unexpected results if the base image changes";
    UNDEFINED_VAR = "UndefinedVar", "undefined-var", "Variables should be defined before their use";
    MULTIPLE_INSTRUCTIONS_DISALLOWED = "MultipleInstructionsDisallowed", "multiple-instructions-disallowed", "Multiple instructions of the same type should not be used in the same stage";
    LEGACY_KEY_VALUE_FORMAT = "LegacyKeyValueFormat", "legacy-key-value-format", "Legacy key/value format with whitespace separator should not be used";
    INVALID_DEFAULT_ARG_IN_FROM = "InvalidDefaultArgInFrom", "invalid-default-arg-in-from", "Default value for global ARG results in an empty or invalid base image name";
    CONSISTENT_INSTRUCTION_CASING = "ConsistentInstructionCasing", "consistent-instruction-casing", "All commands within the Dockerfile should use the same casing (either upper or lower)";
    SECRETS_USED_IN_ARG_OR_ENV = "SecretsUsedInArgOrEnv", "secrets-used-in-arg-or-env", "Sensitive data should not be used in the ARG or ENV commands";
    COPY_IGNORED_FILE = "CopyIgnoredFile", "copy-ignored-file", "Attempting to Copy file that is excluded by .dockerignore";
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LintWarning {
    /// The rule that fired.
    pub rule: Rule,
    /// What exactly is wrong here (BuildKit's wording in spirit).
    pub message: String,
    /// The instruction (or part) it is about.
    pub span: Span,
}

/// The `# check=` directive: rules to skip, and whether warnings fail the build.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct CheckDirective {
    /// Rule names to skip (`all` skips every rule).
    pub skip: Vec<String>,
    /// `error=true`: a check with warnings exits non-zero.
    pub error: bool,
}

impl CheckDirective {
    /// Parses `skip=A,B;error=true` (unknown keys are ignored, as BuildKit does).
    pub fn parse(value: &str) -> Self {
        let mut d = CheckDirective::default();
        for part in value.split(';') {
            let Some((k, v)) = part.split_once('=') else {
                continue;
            };
            match k.trim() {
                "skip" => {
                    d.skip = v
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                }
                "error" => d.error = v.trim().eq_ignore_ascii_case("true"),
                _ => {}
            }
        }
        d
    }

    fn skips(&self, rule: &str) -> bool {
        self.skip
            .iter()
            .any(|s| s == rule || s.eq_ignore_ascii_case("all"))
    }
}

/// Returns the ENV names of an image reference (as written in FROM, expanded), if known.
pub type BaseEnvLookup = dyn Fn(&str) -> Option<Vec<String>>;

/// What the checks may know beyond the Dockerfile.
#[derive(Default)]
pub struct LintContext<'a> {
    /// The main context's `.dockerignore`, for CopyIgnoredFile.
    pub dockerignore: Option<&'a IgnoreMatcher>,
    /// ENV names of an external base image (as written in FROM, expanded), when known; with
    /// `None` only `PATH` is assumed.
    pub base_env: Option<&'a BaseEnvLookup>,
}

/// The result of [`check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LintReport {
    /// Findings in source order.
    pub warnings: Vec<LintWarning>,
    /// From `# check=`.
    pub directive: CheckDirective,
}

impl LintReport {
    /// True when `# check=error=true` and something was found.
    pub fn fails(&self) -> bool {
        self.directive.error && !self.warnings.is_empty()
    }
}

const BUILTIN_ARGS: [&str; 8] = [
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETARCH",
    "TARGETVARIANT",
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDARCH",
    "BUILDVARIANT",
];

/// Runs every rule not skipped by the `# check=` directive.
pub fn check(df: &Dockerfile, ctx: &LintContext<'_>) -> LintReport {
    let directive = df
        .directive("check")
        .map(|d| CheckDirective::parse(&d.value))
        .unwrap_or_default();
    let mut l = Linter {
        df,
        ctx,
        lexer: Lexer::new(df.escape),
        out: Vec::new(),
    };
    l.run();
    let mut warnings: Vec<LintWarning> = l
        .out
        .into_iter()
        .filter(|w| !directive.skips(w.rule.name))
        .collect();
    warnings.sort_by_key(|w| (w.span.start.line, w.span.start.column));
    LintReport {
        warnings,
        directive,
    }
}

struct Linter<'a> {
    df: &'a Dockerfile,
    ctx: &'a LintContext<'a>,
    lexer: Lexer,
    out: Vec<LintWarning>,
}

struct Stage<'a> {
    from: &'a Instruction,
    name: Option<&'a str>,
    base: String,
    body: Vec<&'a Instruction>,
}

fn words(inst: &Instruction) -> Vec<(String, Span)> {
    match &inst.args {
        Args::Words(w) => w.iter().map(|w| (w.text.clone(), w.span)).collect(),
        Args::Text(w) => vec![(w.text.clone(), w.span)],
        Args::Json(j) => j.values.iter().map(|v| (v.clone(), j.span)).collect(),
        Args::KeyValues(kv) => kv
            .iter()
            .map(|p| (format!("{}={}", p.key.text, p.value.text), p.key.span))
            .collect(),
        _ => Vec::new(),
    }
}

fn is_secret_name(name: &str) -> bool {
    const DENY: [&str; 10] = [
        "apikey",
        "auth",
        "credential",
        "credentials",
        "key",
        "password",
        "pword",
        "passwd",
        "secret",
        "token",
    ];
    let lower = name.to_ascii_lowercase();
    let tokens: Vec<&str> = lower.split(['_', '-']).collect();
    if tokens.contains(&"public") {
        return false;
    }
    tokens.iter().any(|t| DENY.contains(t))
}

impl<'a> Linter<'a> {
    fn warn(&mut self, rule: Rule, message: String, span: Span) {
        self.out.push(LintWarning {
            rule,
            message,
            span,
        });
    }

    fn run(&mut self) {
        let mut globals: Vec<(&Instruction, String, Option<String>)> = Vec::new();
        let mut stages: Vec<Stage> = Vec::new();
        for inst in &self.df.instructions {
            match inst.kind() {
                Some(Keyword::From) => {
                    let w = words(inst);
                    let name = if w.len() == 3 {
                        Some(self.intern(&w[2].0))
                    } else {
                        None
                    };
                    stages.push(Stage {
                        from: inst,
                        name,
                        base: w.first().map(|x| x.0.clone()).unwrap_or_default(),
                        body: vec![],
                    });
                }
                _ => match stages.last_mut() {
                    Some(s) => s.body.push(inst),
                    None if inst.kind() == Some(Keyword::Arg) => {
                        for (w, _) in words(inst) {
                            let (k, v) = match w.split_once('=') {
                                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                                None => (w, None),
                            };
                            globals.push((inst, k, v));
                        }
                    }
                    None => {}
                },
            }
        }
        self.casing();
        for (inst, name, _) in &globals {
            if is_secret_name(name) {
                self.warn(
                    SECRETS_USED_IN_ARG_OR_ENV,
                    format!("Do not use ARG or ENV instructions for sensitive data (ARG {name:?})"),
                    inst.span,
                );
            }
        }
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut stage_env: Vec<BTreeSet<String>> = Vec::new();
        for (i, s) in stages.iter().enumerate() {
            self.stage_header_rules(s, &globals, &mut seen);
            let base_lower = s.base.to_ascii_lowercase();
            let inherited = stages[..i].iter().position(|p| {
                p.name.map(str::to_ascii_lowercase).as_deref() == Some(base_lower.as_str())
            });
            let mut env: BTreeSet<String> = match inherited {
                Some(p) => stage_env[p].clone(),
                None => {
                    let expanded = self
                        .lexer
                        .process_word(&s.base, &|n| {
                            globals
                                .iter()
                                .rev()
                                .find(|g| g.1 == n)
                                .and_then(|g| g.2.clone())
                        })
                        .unwrap_or_default();
                    match self.ctx.base_env.and_then(|f| f(&expanded)) {
                        Some(e) => e.into_iter().collect(),
                        None => BTreeSet::from(["PATH".to_string()]),
                    }
                }
            };
            self.stage_rules(s, &globals, &mut env);
            stage_env.push(env);
        }
    }

    fn intern(&self, s: &str) -> &'a str {
        // Stage names are borrowed from the AST; find the word again to keep the lifetime.
        for inst in &self.df.instructions {
            if let Args::Words(w) = &inst.args {
                if let Some(x) = w.iter().find(|x| x.text == s) {
                    return x.text.as_str();
                }
            }
        }
        ""
    }

    fn casing(&mut self) {
        let insts: Vec<&Instruction> = self.df.instructions.iter().collect();
        let upper = insts
            .iter()
            .filter(|i| i.keyword == i.keyword.to_uppercase())
            .count();
        let lower = insts
            .iter()
            .filter(|i| i.keyword == i.keyword.to_lowercase())
            .count();
        let majority_upper = upper >= lower;
        for inst in insts {
            let ok = if majority_upper {
                inst.keyword == inst.keyword.to_uppercase()
            } else {
                inst.keyword == inst.keyword.to_lowercase()
            };
            if !ok {
                let want = if majority_upper {
                    "uppercase"
                } else {
                    "lowercase"
                };
                self.warn(
                    CONSISTENT_INSTRUCTION_CASING,
                    format!(
                        "Command '{}' should match the case of the command majority ({want})",
                        inst.keyword
                    ),
                    inst.span,
                );
            }
        }
    }

    fn stage_header_rules(
        &mut self,
        s: &Stage<'a>,
        globals: &[(&Instruction, String, Option<String>)],
        seen: &mut BTreeMap<String, usize>,
    ) {
        let w = words(s.from);
        if let Some(name) = s.name {
            if name != name.to_ascii_lowercase() {
                self.warn(
                    STAGE_NAME_CASING,
                    format!("Stage name '{name}' should be lowercase"),
                    s.from.span,
                );
            }
            let lower = name.to_ascii_lowercase();
            if lower == "scratch" || lower == "context" {
                self.warn(
                    RESERVED_STAGE_NAME,
                    format!(
                        "Stage name should not use the same name as reserved stage \"{lower}\""
                    ),
                    s.from.span,
                );
            }
            if seen.insert(lower.clone(), s.from.span.start.line).is_some() {
                self.warn(
                    DUPLICATE_STAGE_NAME,
                    format!("Duplicate stage name \"{lower}\", stage names should be unique"),
                    s.from.span,
                );
            }
            let as_kw = &w[1].0;
            let from_kw = &s.from.keyword;
            let from_upper = *from_kw == from_kw.to_uppercase();
            let from_lower = *from_kw == from_kw.to_lowercase();
            let as_upper = *as_kw == as_kw.to_uppercase();
            let as_lower = *as_kw == as_kw.to_lowercase();
            if (from_upper && !as_upper) || (from_lower && !as_lower) {
                self.warn(
                    FROM_AS_CASING,
                    format!("'{as_kw}' and '{from_kw}' keywords' casing do not match"),
                    s.from.span,
                );
            }
        }
        // UndefinedArgInFrom / InvalidDefaultArgInFrom.
        let declared = |n: &str| globals.iter().any(|g| g.1 == n) || BUILTIN_ARGS.contains(&n);
        let mut words_to_check = vec![s.base.clone()];
        words_to_check.extend(
            s.from
                .flags
                .iter()
                .filter(|f| f.name == "platform")
                .filter_map(|f| f.value.clone()),
        );
        for word in &words_to_check {
            let exp = self.lexer.expand(word, &|n| {
                if declared(n) {
                    Some(String::new())
                } else {
                    None
                }
            });
            if let Ok(e) = exp {
                for u in &e.unset {
                    self.warn(
                        UNDEFINED_ARG_IN_FROM,
                        format!("FROM argument '{u}' is not declared"),
                        s.from.span,
                    );
                }
            }
        }
        if s.base.contains('$') {
            let defaults = |n: &str| {
                globals
                    .iter()
                    .rev()
                    .find(|g| g.1 == n)
                    .and_then(|g| g.2.as_ref())
                    .map(|d| self.lexer.process_word(d, &|_| None).unwrap_or_default())
            };
            let v = self
                .lexer
                .process_word(&s.base, &defaults)
                .unwrap_or_default();
            if !plausible_image_name(&v) {
                self.warn(
                    INVALID_DEFAULT_ARG_IN_FROM,
                    format!(
                        "Default value for ARG {} results in empty or invalid base image name",
                        s.base
                    ),
                    s.from.span,
                );
            }
        }
    }

    fn stage_rules(
        &mut self,
        s: &Stage<'a>,
        globals: &[(&Instruction, String, Option<String>)],
        env: &mut BTreeSet<String>,
    ) {
        let _ = globals;
        let mut args: BTreeSet<String> = BTreeSet::new();
        let mut abs_workdir = false;
        let mut counts: BTreeMap<&'static str, Vec<Span>> = BTreeMap::new();
        for inst in &s.body {
            let Some(kind) = inst.kind() else { continue };
            let defined = |n: &str, args: &BTreeSet<String>, env: &BTreeSet<String>| {
                args.contains(n) || env.contains(n)
            };
            // UndefinedVar over the words the builder expands.
            if crate::shell::expands_words(kind).is_some() && kind != Keyword::Arg {
                let mut texts: Vec<String> = words(inst)
                    .into_iter()
                    .map(|w| w.0)
                    .filter(|w| !w.starts_with("<<"))
                    .collect();
                if matches!(kind, Keyword::Env | Keyword::Label) {
                    if let Args::KeyValues(kv) = &inst.args {
                        texts = kv
                            .iter()
                            .flat_map(|p| [p.key.text.clone(), p.value.text.clone()])
                            .collect();
                    }
                }
                if matches!(kind, Keyword::Copy | Keyword::Add) {
                    texts.extend(inst.flags.iter().filter_map(|f| f.value.clone()));
                }
                self.undefined(&texts, inst.span, &|n| defined(n, &args, env));
            }
            match kind {
                Keyword::Arg => {
                    for (w, _) in words(inst) {
                        let (k, v) = match w.split_once('=') {
                            Some((k, v)) => (k.to_string(), Some(v.to_string())),
                            None => (w, None),
                        };
                        if let Some(v) = &v {
                            self.undefined(std::slice::from_ref(v), inst.span, &|n| {
                                defined(n, &args, env)
                            });
                        }
                        if is_secret_name(&k) {
                            self.warn(SECRETS_USED_IN_ARG_OR_ENV, format!("Do not use ARG or ENV instructions for sensitive data (ARG {k:?})"), inst.span);
                        }
                        args.insert(k);
                    }
                }
                Keyword::Env | Keyword::Label => {
                    if let Args::KeyValues(kv) = &inst.args {
                        for p in kv {
                            if p.legacy {
                                let n = inst.name();
                                self.warn(
                                    LEGACY_KEY_VALUE_FORMAT,
                                    format!("\"{n} key=value\" should be used instead of legacy \"{n} key value\" format"),
                                    inst.span,
                                );
                            }
                            if kind == Keyword::Env {
                                let key = self
                                    .lexer
                                    .process_word(&p.key.text, &|_| None)
                                    .unwrap_or_else(|_| p.key.text.clone());
                                if is_secret_name(&key) {
                                    self.warn(SECRETS_USED_IN_ARG_OR_ENV, format!("Do not use ARG or ENV instructions for sensitive data (ENV {key:?})"), inst.span);
                                }
                                env.insert(key);
                            }
                        }
                    }
                }
                Keyword::Workdir => {
                    let w = words(inst).first().map(|x| x.0.clone()).unwrap_or_default();
                    let v = self
                        .lexer
                        .process_word(&w, &|_| Some("x".into()))
                        .unwrap_or(w.clone());
                    if v.starts_with('/') {
                        abs_workdir = true;
                    } else if !abs_workdir {
                        self.warn(
                            WORKDIR_RELATIVE_PATH,
                            format!("Relative workdir \"{w}\" can have unexpected results if the base image changes"),
                            inst.span,
                        );
                    }
                }
                Keyword::Cmd | Keyword::Entrypoint => {
                    if !inst.is_json() {
                        self.warn(
                            JSON_ARGS_RECOMMENDED,
                            format!("JSON arguments recommended for {} to prevent unintended behavior related to OS signals", inst.name()),
                            inst.span,
                        );
                    }
                    counts.entry(kind.as_str()).or_default().push(inst.span);
                }
                Keyword::Healthcheck => counts.entry(kind.as_str()).or_default().push(inst.span),
                Keyword::Maintainer => self.warn(
                    MAINTAINER_DEPRECATED,
                    "Maintainer instruction is deprecated in favor of using label".into(),
                    inst.span,
                ),
                Keyword::Copy | Keyword::Add => self.copy_ignored(inst, kind, &args, env),
                _ => {}
            }
        }
        for (kind, spans) in counts {
            if spans.len() > 1 {
                for sp in &spans[..spans.len() - 1] {
                    self.warn(
                        MULTIPLE_INSTRUCTIONS_DISALLOWED,
                        format!("Multiple {} instructions should not be used in the same stage because only the last one will be used", kind),
                        *sp,
                    );
                }
            }
        }
    }

    fn undefined(&mut self, texts: &[String], span: Span, defined: &dyn Fn(&str) -> bool) {
        for t in texts {
            let Ok(e) = self.lexer.expand(t, &|n| {
                if defined(n) {
                    Some(String::new())
                } else {
                    None
                }
            }) else {
                continue;
            };
            for u in e.unset {
                self.warn(
                    UNDEFINED_VAR,
                    format!("Usage of undefined variable '${u}'"),
                    span,
                );
            }
        }
    }

    fn copy_ignored(
        &mut self,
        inst: &Instruction,
        kind: Keyword,
        args: &BTreeSet<String>,
        env: &BTreeSet<String>,
    ) {
        let Some(m) = self.ctx.dockerignore else {
            return;
        };
        if m.is_empty() || inst.flags.iter().any(|f| f.name == "from") {
            return;
        }
        let ws = words(inst);
        if ws.len() < 2 {
            return;
        }
        let verb = if kind == Keyword::Add { "Add" } else { "Copy" };
        for (src, _) in &ws[..ws.len() - 1] {
            if src.starts_with("<<") || src.contains("://") {
                continue;
            }
            let v = self
                .lexer
                .process_word(src, &|n| {
                    (args.contains(n) || env.contains(n)).then(String::new)
                })
                .unwrap_or_else(|_| src.clone());
            let p = clean_path(v.trim_start_matches('/'));
            if p != "." && m.matches(&p) {
                self.warn(
                    COPY_IGNORED_FILE,
                    format!("Attempting to {verb} file \"{v}\" that is excluded by .dockerignore"),
                    inst.span,
                );
            }
        }
    }
}

/// A loose check that an expanded FROM is a usable name: non-empty, no dangling `:`/`@`,
/// lower-case repository.
fn plausible_image_name(v: &str) -> bool {
    if v.is_empty()
        || v.ends_with(':')
        || v.ends_with('@')
        || v.starts_with(':')
        || v.contains(char::is_whitespace)
    {
        return false;
    }
    let name = v.split('@').next().unwrap_or(v);
    let last = name.rsplit('/').next().unwrap_or(name);
    let repo_part = match last.split_once(':') {
        Some((r, _)) => r,
        None => last,
    };
    !repo_part.is_empty() && repo_part == repo_part.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lint_with(src: &str, ignore: &[&str]) -> Vec<(&'static str, String, usize)> {
        let df = crate::parse(src).expect("test Dockerfile parses");
        let m = IgnoreMatcher::from_patterns(ignore).expect("patterns compile");
        let ctx = LintContext {
            dockerignore: Some(&m),
            base_env: None,
        };
        check(&df, &ctx)
            .warnings
            .into_iter()
            .map(|w| (w.rule.name, w.message, w.span.start.line))
            .collect()
    }

    fn lint(src: &str) -> Vec<(&'static str, String, usize)> {
        lint_with(src, &[])
    }

    fn rules_of(src: &str) -> Vec<&'static str> {
        lint(src).into_iter().map(|w| w.0).collect()
    }

    /// Asserts that `bad` fires exactly `rule` (once, with `message`) and `good` fires nothing.
    fn fires(rule: &str, bad: &str, message: &str, good: &str) {
        let got = lint(bad);
        let hits: Vec<_> = got.iter().filter(|w| w.0 == rule).collect();
        assert_eq!(hits.len(), 1, "{rule} on {bad:?}: {got:?}");
        assert_eq!(hits[0].1, message);
        let clean = lint(good);
        assert!(clean.is_empty(), "clean case for {rule} warned: {clean:?}");
    }

    #[test]
    fn stage_name_casing() {
        fires(
            "StageNameCasing",
            "FROM busybox AS Build\n",
            "Stage name 'Build' should be lowercase",
            "FROM busybox AS build\n",
        );
    }

    #[test]
    fn from_as_casing() {
        fires(
            "FromAsCasing",
            "FROM busybox as build\n",
            "'as' and 'FROM' keywords' casing do not match",
            "FROM busybox AS build\n",
        );
    }

    #[test]
    fn duplicate_stage_name() {
        fires(
            "DuplicateStageName",
            "FROM busybox AS a\nFROM busybox AS a\n",
            "Duplicate stage name \"a\", stage names should be unique",
            "FROM busybox AS a\nFROM busybox AS b\n",
        );
    }

    #[test]
    fn reserved_stage_name() {
        fires(
            "ReservedStageName",
            "FROM busybox AS scratch\n",
            "Stage name should not use the same name as reserved stage \"scratch\"",
            "FROM busybox AS base\n",
        );
        assert_eq!(rules_of("FROM busybox AS context\n"), ["ReservedStageName"]);
    }

    #[test]
    fn json_args_recommended() {
        fires(
            "JSONArgsRecommended",
            "FROM busybox\nCMD echo hi\n",
            "JSON arguments recommended for CMD to prevent unintended behavior related to OS signals",
            "FROM busybox\nCMD [\"echo\", \"hi\"]\n",
        );
        assert_eq!(
            rules_of("FROM busybox\nENTRYPOINT top -b\n"),
            ["JSONArgsRecommended"]
        );
    }

    #[test]
    fn maintainer_deprecated() {
        fires(
            "MaintainerDeprecated",
            "FROM busybox\nMAINTAINER me@example.com\n",
            "Maintainer instruction is deprecated in favor of using label",
            "FROM busybox\nLABEL org.opencontainers.image.authors=me@example.com\n",
        );
    }

    #[test]
    fn undefined_arg_in_from() {
        fires(
            "UndefinedArgInFrom",
            "FROM busybox:${VERSION}\n",
            "FROM argument 'VERSION' is not declared",
            "ARG VERSION=1.36\nFROM busybox:${VERSION}\nFROM --platform=$BUILDPLATFORM busybox\n",
        );
    }

    #[test]
    fn workdir_relative_path() {
        fires(
            "WorkdirRelativePath",
            "FROM busybox\nWORKDIR app\n",
            "Relative workdir \"app\" can have unexpected results if the base image changes",
            "FROM busybox\nWORKDIR /srv\nWORKDIR app\n",
        );
    }

    #[test]
    fn undefined_var() {
        fires(
            "UndefinedVar",
            "FROM busybox\nCOPY $SRC /app/\n",
            "Usage of undefined variable '$SRC'",
            "FROM busybox\nARG SRC=.\nENV DEST=/app\nCOPY $SRC $DEST/\nENV PATH=$PATH:/x\nRUN echo $NOT_CHECKED_IN_RUN\n",
        );
    }

    #[test]
    fn undefined_var_sees_env_of_a_parent_stage() {
        assert!(lint("FROM busybox AS a\nENV X=1\nFROM a\nWORKDIR /$X\n").is_empty());
        assert_eq!(
            rules_of("FROM busybox AS a\nENV X=1\nFROM busybox\nWORKDIR /$X\n"),
            ["UndefinedVar"]
        );
    }

    #[test]
    fn multiple_instructions_disallowed() {
        fires(
            "MultipleInstructionsDisallowed",
            "FROM busybox\nCMD [\"a\"]\nCMD [\"b\"]\n",
            "Multiple CMD instructions should not be used in the same stage because only the last one will be used",
            "FROM busybox\nCMD [\"a\"]\nFROM busybox\nCMD [\"b\"]\n",
        );
    }

    #[test]
    fn legacy_key_value_format() {
        fires(
            "LegacyKeyValueFormat",
            "FROM busybox\nENV A 1\n",
            "\"ENV key=value\" should be used instead of legacy \"ENV key value\" format",
            "FROM busybox\nENV A=1\n",
        );
    }

    #[test]
    fn invalid_default_arg_in_from() {
        fires(
            "InvalidDefaultArgInFrom",
            "ARG TAG\nFROM busybox:${TAG}\n",
            "Default value for ARG busybox:${TAG} results in empty or invalid base image name",
            "ARG TAG=1.36\nFROM busybox:${TAG}\n",
        );
    }

    #[test]
    fn consistent_instruction_casing() {
        fires(
            "ConsistentInstructionCasing",
            "FROM busybox\nRUN true\nrun true\n",
            "Command 'run' should match the case of the command majority (uppercase)",
            "from busybox\nrun true\n",
        );
    }

    #[test]
    fn secrets_used_in_arg_or_env() {
        fires(
            "SecretsUsedInArgOrEnv",
            "FROM busybox\nARG GITHUB_TOKEN\n",
            "Do not use ARG or ENV instructions for sensitive data (ARG \"GITHUB_TOKEN\")",
            "FROM busybox\nARG PUBLIC_KEY\nENV TOKENIZER=x\n",
        );
        assert_eq!(
            rules_of("FROM busybox\nENV DB_PASSWORD=x\n"),
            ["SecretsUsedInArgOrEnv"]
        );
    }

    #[test]
    fn copy_ignored_file() {
        let got = lint_with("FROM busybox\nCOPY secrets.env /app/\n", &["*.env"]);
        assert_eq!(
            got,
            [(
                "CopyIgnoredFile",
                "Attempting to Copy file \"secrets.env\" that is excluded by .dockerignore"
                    .to_string(),
                2
            )]
        );
        assert!(lint_with(
            "FROM busybox\nCOPY app.conf /app/\nCOPY --from=busybox a.env /\n",
            &["*.env"]
        )
        .is_empty());
        let add = lint_with("FROM busybox\nADD tmp/x.tar /\n", &["tmp"]);
        assert_eq!(
            add[0].1,
            "Attempting to Add file \"tmp/x.tar\" that is excluded by .dockerignore"
        );
    }

    #[test]
    fn check_directive_skips_rules_and_sets_error() {
        let src = "# check=skip=JSONArgsRecommended,StageNameCasing;error=true\nFROM busybox AS Build\nCMD x\nMAINTAINER a\n";
        let df = crate::parse(src).unwrap();
        let r = check(&df, &LintContext::default());
        let names: Vec<_> = r.warnings.iter().map(|w| w.rule.name).collect();
        assert_eq!(names, ["MaintainerDeprecated"]);
        assert!(r.fails());
        let df = crate::parse("# check=skip=all\nFROM busybox AS Build\nCMD x\n").unwrap();
        let r = check(&df, &LintContext::default());
        assert!(r.warnings.is_empty() && !r.fails());
    }

    #[test]
    fn every_rule_has_a_docs_url() {
        assert_eq!(ALL_RULES.len(), 15);
        for r in ALL_RULES {
            assert!(r
                .url()
                .starts_with("https://docs.docker.com/go/dockerfile/rule/"));
        }
    }
}
