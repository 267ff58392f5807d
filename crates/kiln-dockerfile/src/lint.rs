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
    REDUNDANT_TARGET_PLATFORM = "RedundantTargetPlatform", "redundant-target-platform", "Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default behavior";
    FROM_PLATFORM_FLAG_CONST_DISALLOWED = "FromPlatformFlagConstDisallowed", "from-platform-flag-const-disallowed", "FROM --platform flag should not use a constant value";
    EXPOSE_PROTO_CASING = "ExposeProtoCasing", "expose-proto-casing", "Protocol in EXPOSE instruction should be lowercase";
    EXPOSE_INVALID_FORMAT = "ExposeInvalidFormat", "expose-invalid-format", "IP address and host-port mapping should not be used in EXPOSE instruction. This will become an error in a future release";
    NO_EMPTY_CONTINUATION = "NoEmptyContinuation", "no-empty-continuation", "Empty continuation lines will become errors in a future release";
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
    /// Rule names to skip.
    pub skip: Vec<String>,
    /// `skip=all`: no rule runs.
    pub skip_all: bool,
    /// `error=true`: a build or check with warnings fails.
    pub error: bool,
}

/// A `# check=` directive (or `BUILDKIT_DOCKERFILE_CHECK` build arg) that BuildKit would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to parse check options: {reason}")]
pub struct CheckDirectiveError {
    /// What is wrong, in BuildKit's words (`invalid check option "x"`).
    pub reason: String,
}

impl CheckDirective {
    /// Parses `skip=A,B;error=true` as BuildKit does: at most two `;`-separated parts, each
    /// `key=value` with `skip` or `error` as key, `error` a Go boolean, and `skip=all` alone
    /// meaning every rule.
    pub fn parse(value: &str) -> Result<Self, CheckDirectiveError> {
        let mut d = CheckDirective::default();
        let value = value.trim();
        if value.is_empty() {
            return Ok(d);
        }
        let invalid = |what: &str| CheckDirectiveError {
            reason: format!("invalid check option {what:?}"),
        };
        for part in value.splitn(2, ';') {
            let Some((k, v)) = part.split_once('=') else {
                return Err(invalid(part));
            };
            match k.trim() {
                "skip" => {
                    let v = v.trim();
                    if v == "all" {
                        d.skip_all = true;
                    } else {
                        d.skip = v.split(',').map(|s| s.trim().to_string()).collect();
                    }
                }
                "error" => {
                    // Go's strconv.ParseBool spellings.
                    d.error = match v.trim() {
                        "1" | "t" | "T" | "true" | "TRUE" | "True" => true,
                        "0" | "f" | "F" | "false" | "FALSE" | "False" => false,
                        other => {
                            return Err(CheckDirectiveError {
                                reason: format!(
                                    "check option \"error\" wants true or false, got {other:?}"
                                ),
                            })
                        }
                    }
                }
                other => return Err(invalid(other)),
            }
        }
        Ok(d)
    }

    fn skips(&self, rule: &str) -> bool {
        self.skip_all || self.skip.iter().any(|s| s == rule)
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
    /// The `BUILDKIT_DOCKERFILE_CHECK` build arg, which replaces the `# check=` directive.
    pub check_override: Option<&'a str>,
    /// Whose instructions are checked.
    pub stages: LintStages<'a>,
}

/// Which stages' instructions the checks look at. Rules about the file and the FROM lines
/// (casing, stage names, base names, MAINTAINER) always see every stage; the rules BuildKit runs
/// while it converts instructions (UndefinedVar, WorkdirRelativePath, ...) see only the stages it
/// converts: all of them for `--call check` without a target, else those the target needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LintStages<'a> {
    /// Every stage (`--call check` without `--target`).
    #[default]
    All,
    /// The stages this target needs (`None`: the last stage), as a build converts them.
    NeededBy(Option<&'a str>),
}

/// The result of [`check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LintReport {
    /// Findings in source order.
    pub warnings: Vec<LintWarning>,
    /// From `# check=` (or the build arg that overrides it).
    pub directive: CheckDirective,
}

impl LintReport {
    /// True when `# check=error=true` and something was found: the build must stop.
    pub fn fails(&self) -> bool {
        self.directive.error && !self.warnings.is_empty()
    }

    /// BuildKit's error for [`LintReport::fails`]: `lint violation found for rules: A, B`
    /// (each rule once, sorted).
    pub fn violation_message(&self) -> String {
        let rules: BTreeSet<&str> = self.warnings.iter().map(|w| w.rule.name).collect();
        format!(
            "lint violation found for rules: {}",
            rules.into_iter().collect::<Vec<_>>().join(", ")
        )
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

/// The built-in platform ARGs with this machine's values, as a build without `--platform`
/// sees them before any build arg is applied.
fn builtin_platform_values() -> BTreeMap<String, String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    let mut v = BTreeMap::new();
    for prefix in ["TARGET", "BUILD"] {
        v.insert(format!("{prefix}PLATFORM"), format!("linux/{arch}"));
        v.insert(format!("{prefix}OS"), "linux".to_string());
        v.insert(format!("{prefix}ARCH"), arch.to_string());
        v.insert(format!("{prefix}VARIANT"), String::new());
    }
    v
}

/// Runs every rule not skipped by the `# check=` directive; a directive BuildKit would refuse
/// is an error, as it fails the build there.
pub fn check(df: &Dockerfile, ctx: &LintContext<'_>) -> Result<LintReport, CheckDirectiveError> {
    let directive = match ctx.check_override {
        Some(v) => CheckDirective::parse(v)?,
        None => match df.directive("check") {
            Some(d) => CheckDirective::parse(&d.value)?,
            None => CheckDirective::default(),
        },
    };
    let mut l = Linter {
        df,
        ctx,
        lexer: Lexer::new(df.escape),
        out: Vec::new(),
    };
    l.run();
    // The parser finds empty lines inside a continued instruction; BuildKit reports each
    // such instruction under this rule.
    for w in &df.warnings {
        if w.message.starts_with("Empty continuation line") {
            l.warn(NO_EMPTY_CONTINUATION, w.message.clone(), w.span);
        }
    }
    let mut warnings: Vec<LintWarning> = l
        .out
        .into_iter()
        .filter(|w| !directive.skips(w.rule.name))
        .collect();
    warnings.sort_by_key(|w| (w.span.start.line, w.span.start.column));
    Ok(LintReport {
        warnings,
        directive,
    })
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

/// One name of a global `ARG` (before the first FROM), with its default as written.
struct GlobalArg {
    name: String,
    default: Option<String>,
}

/// What a stage knows while its instructions are checked; a stage built `FROM` it starts with
/// a copy, as BuildKit's stage inherits its parent's state.
#[derive(Clone, Default)]
struct StageScope {
    /// Variables set by ENV and ARG (and the base image) with their values; `None` is a value
    /// the base image sets that the linter cannot see.
    vars: BTreeMap<String, Option<String>>,
    /// Names declared by ARG (defined for UndefinedVar even without a value).
    args: BTreeSet<String>,
    /// A WORKDIR already ran here: WorkdirRelativePath judges only the first one.
    workdir_set: bool,
    /// A SHELL instruction chose the shell, so a shell-form CMD/ENTRYPOINT is deliberate.
    shell_set: bool,
}

impl StageScope {
    fn defines(&self, name: &str) -> bool {
        self.args.contains(name) || self.vars.contains_key(name)
    }

    /// The value `$name` expands to. A value only the base image knows counts as `/`: such
    /// variables (HOME, GOPATH ...) hold absolute paths, and a guess must not raise a warning
    /// BuildKit, which sees the image, would not.
    fn lookup(&self, name: &str) -> Option<String> {
        self.vars
            .get(name)
            .map(|v| v.clone().unwrap_or_else(|| "/".to_string()))
    }
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

/// BuildKit's SecretsUsedInArgOrEnv test: some `_`-separated token of the name is a secret
/// word (`GITHUB_TOKEN`, `db_password`, `AUTH`) and none is `public` (`PUBLIC_KEY`). Only `_`
/// separates tokens, so `A-TOKEN` and `TOKENIZER` pass.
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
    let tokens: Vec<&str> = lower.split('_').collect();
    !tokens.contains(&"public") && tokens.iter().any(|t| DENY.contains(t))
}

/// Which stages `target` (`None`: the last one) needs: itself, its FROM parent, and the
/// stages named by `COPY --from` / `ADD --from` / `RUN --mount=from=`, transitively. An unknown
/// target needs every stage (the build fails on it before any rule matters).
fn needed_stages(stages: &[Stage], target: Option<&str>) -> Vec<bool> {
    let by_name = |n: &str| {
        let n = n.to_ascii_lowercase();
        stages
            .iter()
            .position(|s| s.name.is_some_and(|x| x.to_ascii_lowercase() == n))
            .or_else(|| n.parse::<usize>().ok().filter(|&i| i < stages.len()))
    };
    let Some(start) = (match target {
        Some(t) => by_name(t),
        None => stages.len().checked_sub(1),
    }) else {
        return vec![true; stages.len()];
    };
    let mut needed = vec![false; stages.len()];
    let mut todo = vec![start];
    while let Some(i) = todo.pop() {
        if std::mem::replace(&mut needed[i], true) {
            continue;
        }
        let s = &stages[i];
        let mut refs = vec![s.base.clone()];
        for inst in &s.body {
            for f in &inst.flags {
                let Some(v) = &f.value else { continue };
                match f.name.as_str() {
                    "from" => refs.push(v.clone()),
                    "mount" => refs.extend(
                        v.split(',')
                            .filter_map(|kv| kv.trim().strip_prefix("from="))
                            .map(|x| x.trim_matches('"').to_string()),
                    ),
                    _ => {}
                }
            }
        }
        for r in refs {
            // A FROM names a stage only by name; a stage's own name does not count.
            if let Some(j) = by_name(&r).filter(|&j| j != i) {
                todo.push(j);
            }
        }
    }
    needed
}

fn split_arg(word: String) -> (String, Option<String>) {
    match word.split_once('=') {
        Some((k, v)) => (k.to_string(), Some(v.to_string())),
        None => (word, None),
    }
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
        let mut globals: Vec<GlobalArg> = Vec::new();
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
                            let (name, default) = split_arg(w);
                            globals.push(GlobalArg { name, default });
                        }
                    }
                    None => {}
                },
            }
        }
        self.casing();
        // Global ARGs are not checked by SecretsUsedInArgOrEnv: BuildKit runs that rule when a
        // stage's ARG or ENV is dispatched, never on the meta ARGs before the first FROM.
        let defaults = self.global_defaults(&globals);
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut scopes: Vec<StageScope> = Vec::new();
        let needed = match self.ctx.stages {
            LintStages::All => vec![true; stages.len()],
            LintStages::NeededBy(target) => needed_stages(&stages, target),
        };
        for (i, s) in stages.iter().enumerate() {
            self.stage_header_rules(s, &globals, defaults.as_ref(), &mut seen);
            let values = defaults.clone().unwrap_or_default();
            let base = self
                .lexer
                .process_word(&s.base, &|n| values.get(n).cloned())
                .unwrap_or_else(|_| s.base.clone());
            let base_lower = base.to_ascii_lowercase();
            let parent = stages[..i].iter().position(|p| {
                p.name.map(str::to_ascii_lowercase).as_deref() == Some(base_lower.as_str())
            });
            let mut scope = match parent {
                Some(p) => scopes[p].clone(),
                None => {
                    let names = self
                        .ctx
                        .base_env
                        .and_then(|f| f(&base))
                        .unwrap_or_else(|| vec!["PATH".to_string()]);
                    StageScope {
                        vars: names.into_iter().map(|n| (n, None)).collect(),
                        ..StageScope::default()
                    }
                }
            };
            let before = self.out.len();
            self.stage_rules(s, &values, &mut scope);
            if !needed[i] {
                // Parsed but never converted: only the parse-time rule speaks.
                let tail = self.out.split_off(before);
                self.out
                    .extend(tail.into_iter().filter(|w| w.rule == MAINTAINER_DEPRECATED));
            }
            scopes.push(scope);
        }
    }

    /// The global ARGs' values when no build arg is given (BuildKit's meta ARGs): in order, each
    /// default expanded with the ones before it and the built-in platform ARGs, so
    /// `ARG GO_IMAGE=golang:${GO_VERSION}` sees `GO_VERSION`. `None` when a default cannot be
    /// expanded at all (the build fails on it with its own error).
    fn global_defaults(&self, globals: &[GlobalArg]) -> Option<BTreeMap<String, String>> {
        let mut values = builtin_platform_values();
        for g in globals {
            if let Some(d) = &g.default {
                let v = self
                    .lexer
                    .process_word(d, &|n| values.get(n).cloned())
                    .ok()?;
                values.insert(g.name.clone(), v);
            }
        }
        Some(values)
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
        // BuildKit counts and checks the stages' instructions only; the global ARGs before the
        // first FROM are not part of any stage.
        let insts: Vec<&Instruction> = self
            .df
            .instructions
            .iter()
            .skip_while(|i| i.kind() != Some(Keyword::From))
            .collect();
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
        globals: &[GlobalArg],
        defaults: Option<&BTreeMap<String, String>>,
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
        for f in s.from.flags.iter().filter(|f| f.name == "platform") {
            let Some(v) = f.value.as_deref() else {
                continue;
            };
            if v == "$TARGETPLATFORM" || v == "${TARGETPLATFORM}" {
                self.warn(
                    REDUNDANT_TARGET_PLATFORM,
                    format!("Setting platform to predefined {v} in FROM is redundant as this is the default behavior"),
                    s.from.span,
                );
            } else if !v.contains('$') {
                // A stage named after the platform it pins (`runtime-amd64`) is deliberate.
                let name = s.name.unwrap_or("").to_ascii_lowercase();
                let named_for_it = !name.is_empty()
                    && v.split('/')
                        .filter(|p| !p.is_empty())
                        .any(|p| name.contains(&p.to_ascii_lowercase()));
                if !named_for_it {
                    self.warn(
                        FROM_PLATFORM_FLAG_CONST_DISALLOWED,
                        format!("FROM --platform flag should not use constant value \"{v}\""),
                        s.from.span,
                    );
                }
            }
        }
        // UndefinedArgInFrom: names neither a global ARG nor a built-in platform ARG.
        let declared = |n: &str| globals.iter().any(|g| g.name == n) || BUILTIN_ARGS.contains(&n);
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
        // InvalidDefaultArgInFrom: with only the defaults (no build args), every base must
        // still be a valid image reference (or stage name), whether or not it uses an ARG.
        if let Some(values) = defaults {
            if let Ok(v) = self
                .lexer
                .process_word(&s.base, &|n| values.get(n).cloned())
            {
                if !is_valid_reference(&v) {
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
    }

    fn stage_rules(
        &mut self,
        s: &Stage<'a>,
        globals: &BTreeMap<String, String>,
        scope: &mut StageScope,
    ) {
        let mut counts: BTreeMap<&'static str, Vec<Span>> = BTreeMap::new();
        for inst in &s.body {
            let Some(kind) = inst.kind() else { continue };
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
                let known = scope.clone();
                self.undefined(&texts, inst.span, &|n| known.defines(n));
            }
            match kind {
                Keyword::Arg => {
                    for (w, _) in words(inst) {
                        let (k, v) = split_arg(w);
                        if let Some(v) = &v {
                            let known = scope.clone();
                            self.undefined(std::slice::from_ref(v), inst.span, &|n| {
                                known.defines(n)
                            });
                        }
                        if is_secret_name(&k) {
                            self.warn(SECRETS_USED_IN_ARG_OR_ENV, format!("Do not use ARG or ENV instructions for sensitive data (ARG {k:?})"), inst.span);
                        }
                        // The value the stage sees: its default expanded here, else the global
                        // ARG's value; a bare `ARG X` with neither leaves X unset.
                        let value = match &v {
                            Some(d) => Some(
                                self.lexer
                                    .process_word(d, &|n| scope.lookup(n))
                                    .unwrap_or_default(),
                            ),
                            None => globals.get(&k).cloned(),
                        };
                        scope.args.insert(k.clone());
                        if let Some(value) = value {
                            scope.vars.insert(k, Some(value));
                        }
                    }
                }
                Keyword::Env | Keyword::Label => {
                    let mut set = Vec::new();
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
                                // Every value of one ENV expands with the variables as they
                                // were before it.
                                let value = self
                                    .lexer
                                    .process_word(&p.value.text, &|n| scope.lookup(n))
                                    .unwrap_or_default();
                                set.push((key, value));
                            }
                        }
                    }
                    for (k, v) in set {
                        scope.vars.insert(k, Some(v));
                    }
                }
                Keyword::Workdir => {
                    // BuildKit judges the path after expansion (`ENV HOME=/app` then
                    // `WORKDIR $HOME` is absolute), and only the stage's first WORKDIR: fixing
                    // that one fixes the rest.
                    let raw = words(inst).first().map(|x| x.0.clone()).unwrap_or_default();
                    let path = self
                        .lexer
                        .process_word(&raw, &|n| scope.lookup(n))
                        .unwrap_or_else(|_| raw.clone());
                    if !scope.workdir_set && !path.starts_with('/') {
                        self.warn(
                            WORKDIR_RELATIVE_PATH,
                            format!("Relative workdir \"{path}\" can have unexpected results if the base image changes"),
                            inst.span,
                        );
                    }
                    scope.workdir_set = true;
                }
                Keyword::Shell => scope.shell_set = true,
                Keyword::Cmd | Keyword::Entrypoint => {
                    // After SHELL the shell form is a deliberate choice; BuildKit stays quiet.
                    if !inst.is_json() && !scope.shell_set {
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
                Keyword::Copy | Keyword::Add => self.copy_ignored(inst, kind, scope),
                Keyword::Expose => {
                    for (port, span) in words(inst) {
                        if port.contains(':') {
                            self.warn(
                                EXPOSE_INVALID_FORMAT,
                                format!("EXPOSE instruction should not define an IP address or host-port mapping, found '{port}'"),
                                span,
                            );
                        }
                        if let Some((_, proto)) = port.split_once('/') {
                            if proto != proto.to_ascii_lowercase() {
                                self.warn(
                                    EXPOSE_PROTO_CASING,
                                    format!("Defined protocol '{port}' in EXPOSE instruction should be lowercase"),
                                    span,
                                );
                            }
                        }
                    }
                }
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

    fn copy_ignored(&mut self, inst: &Instruction, kind: Keyword, scope: &StageScope) {
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
                    scope.vars.get(n).map(|v| v.clone().unwrap_or_default())
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

/// A base image name Docker would accept: `docker/distribution`'s `ParseNormalizedNamed`
/// rules, which kiln-oci's reference parser implements (the same parser the build uses).
fn is_valid_reference(v: &str) -> bool {
    v.parse::<kiln_oci::Reference>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lint_with(src: &str, ignore: &[&str]) -> Vec<(&'static str, String, usize)> {
        let df = crate::parse(src).expect("test Dockerfile parses");
        let m = IgnoreMatcher::from_patterns(ignore).expect("patterns compile");
        let ctx = LintContext {
            dockerignore: Some(&m),
            ..LintContext::default()
        };
        check(&df, &ctx)
            .expect("check directive parses")
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
            "FROM busybox\nARG PUBLIC_KEY\nENV TOKENIZER=x\nENV A-TOKEN=x\n",
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
        let r = check(&df, &LintContext::default()).unwrap();
        let names: Vec<_> = r.warnings.iter().map(|w| w.rule.name).collect();
        assert_eq!(names, ["MaintainerDeprecated"]);
        assert!(r.fails());
        assert_eq!(
            r.violation_message(),
            "lint violation found for rules: MaintainerDeprecated"
        );
        let df = crate::parse("# check=skip=all\nFROM busybox AS Build\nCMD x\n").unwrap();
        let r = check(&df, &LintContext::default()).unwrap();
        assert!(r.warnings.is_empty() && !r.fails());
    }

    #[test]
    fn check_directive_refuses_what_buildkit_refuses() {
        for bad in ["skip", "error=maybe", "skip=A;color=red", "nonsense=1"] {
            let err = CheckDirective::parse(bad).expect_err(bad);
            assert!(
                err.to_string()
                    .starts_with("failed to parse check options: "),
                "{bad}: {err}"
            );
        }
        // `all` only means every rule when it stands alone.
        let d = CheckDirective::parse("skip=all,StageNameCasing").unwrap();
        assert!(!d.skip_all && !d.skips("JSONArgsRecommended") && d.skips("StageNameCasing"));
        assert!(CheckDirective::parse(" error=1 ").unwrap().error);
    }

    #[test]
    fn build_arg_check_override_replaces_the_directive() {
        let df = crate::parse("# check=error=true\nFROM busybox AS Build\n").unwrap();
        let ctx = LintContext {
            check_override: Some("skip=StageNameCasing"),
            ..LintContext::default()
        };
        let r = check(&df, &ctx).unwrap();
        assert!(r.warnings.is_empty() && !r.directive.error);
    }

    #[test]
    fn invalid_default_arg_in_from_evaluates_global_args_in_order() {
        // Each default sees the ARGs before it and the built-in platform ARGs.
        for ok in [
            "ARG GO_VERSION=1.22\nARG GO_IMAGE=golang:${GO_VERSION}\nFROM ${GO_IMAGE}\n",
            "ARG IMG=busybox:${TARGETARCH}\nFROM ${IMG}\n",
            "ARG V=1.36\nARG V\nFROM busybox:${V}\n",
            "ARG REG=localhost:5000\nFROM ${REG}/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n",
            "FROM busybox AS build\nFROM build\n",
        ] {
            assert!(
                !rules_of(ok).contains(&"InvalidDefaultArgInFrom"),
                "{ok:?}: {:?}",
                lint(ok)
            );
        }
        // A later ARG cannot feed an earlier one; an unset one leaves a dangling `:`.
        for (bad, line) in [
            (
                "ARG GO_IMAGE=golang:${GO_VERSION}\nARG GO_VERSION=1.22\nFROM ${GO_IMAGE}\n",
                3,
            ),
            ("ARG TAG\nFROM busybox:${TAG}\n", 2),
            ("FROM Busybox\n", 1),
            ("ARG REPO=My/App\nFROM ${REPO}\n", 2),
            ("ARG D=sha256:abc\nFROM busybox@${D}\n", 2),
        ] {
            let hits: Vec<_> = lint(bad)
                .into_iter()
                .filter(|w| w.0 == "InvalidDefaultArgInFrom")
                .map(|w| w.2)
                .collect();
            assert_eq!(hits, [line], "{bad:?}");
        }
    }

    #[test]
    fn workdir_relative_path_judges_the_expanded_path() {
        assert!(lint("FROM busybox\nENV HOME=/app\nWORKDIR $HOME\n").is_empty());
        assert!(lint("FROM busybox\nARG DIR=/srv\nWORKDIR ${DIR}/app\n").is_empty());
        let got = lint("FROM busybox\nENV D=rel\nWORKDIR $D\nWORKDIR again\n");
        assert_eq!(
            got,
            [(
                "WorkdirRelativePath",
                "Relative workdir \"rel\" can have unexpected results if the base image changes"
                    .to_string(),
                3
            )]
        );
        // A WORKDIR in the parent stage counts for the child.
        assert!(lint("FROM busybox AS a\nWORKDIR /w\nFROM a\nWORKDIR sub\n").is_empty());
        // A variable only the base image sets is taken to hold an absolute path.
        assert!(lint("FROM busybox\nWORKDIR $PATH\n").is_empty());
    }

    #[test]
    fn secrets_rule_splits_on_underscores_only_and_allows_public() {
        for secret in [
            "AUTH",
            "Token_x",
            "MY_SECRET_FILE",
            "API_KEY_VERSION",
            "db_password",
        ] {
            assert_eq!(
                rules_of(&format!("FROM busybox\nARG {secret}\n")),
                ["SecretsUsedInArgOrEnv"],
                "{secret}"
            );
        }
        for fine in ["A-TOKEN", "TOKENIZER", "PUBLIC_KEY", "my_public_token"] {
            assert!(
                lint(&format!("FROM busybox\nENV {fine}=1\n")).is_empty(),
                "{fine}"
            );
        }
        // Global ARGs are meta arguments: the rule runs on stage ARG and ENV only.
        assert!(lint("ARG GITHUB_TOKEN\nFROM busybox\n").is_empty());
    }

    #[test]
    fn json_args_recommended_is_quiet_after_shell() {
        assert!(lint("FROM busybox\nSHELL [\"/bin/sh\", \"-c\"]\nCMD echo hi\n").is_empty());
        assert!(
            lint("FROM busybox AS a\nSHELL [\"/bin/ash\", \"-c\"]\nFROM a\nENTRYPOINT top\n")
                .is_empty()
        );
    }

    #[test]
    fn instruction_casing_ignores_global_args() {
        assert!(lint("arg V=1\nFROM busybox:${V}\nRUN true\n").is_empty());
    }

    #[test]
    fn reference_grammar() {
        for ok in [
            "busybox",
            "busybox:1.36",
            "library/busybox:latest",
            "localhost:5000/a/b",
            "Registry.Example.com/a",
            "[::1]:5000/a",
            "a__b/c-d---e",
            "scratch",
        ] {
            assert!(is_valid_reference(ok), "{ok}");
        }
        for bad in [
            "",
            "busybox:",
            ":1.0",
            "Busybox",
            "a//b",
            "-a",
            "a___b",
            "busybox:-x",
            "busybox@sha256:12",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(!is_valid_reference(bad), "{bad}");
        }
    }

    #[test]
    fn a_build_checks_only_the_stages_its_target_needs() {
        let src = "FROM busybox AS other\nMAINTAINER me\nCMD echo hi\nWORKDIR rel\n\
                   FROM busybox AS dep\nWORKDIR dep\n\
                   FROM busybox AS x\nCOPY --from=dep / /\nCMD echo x\n";
        let df = crate::parse(src).unwrap();
        let run = |stages| {
            let ctx = LintContext {
                stages,
                ..LintContext::default()
            };
            check(&df, &ctx)
                .unwrap()
                .warnings
                .iter()
                .map(|w| (w.rule.name, w.span.start.line))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            run(LintStages::NeededBy(Some("x"))),
            [
                ("MaintainerDeprecated", 2),
                ("WorkdirRelativePath", 6),
                ("JSONArgsRecommended", 9)
            ]
        );
        assert_eq!(
            run(LintStages::NeededBy(None)),
            run(LintStages::NeededBy(Some("x")))
        );
        assert_eq!(run(LintStages::All).len(), 5);
    }

    #[test]
    fn every_rule_has_a_docs_url() {
        assert_eq!(ALL_RULES.len(), 20);
        for r in ALL_RULES {
            assert!(r
                .url()
                .starts_with("https://docs.docker.com/go/dockerfile/rule/"));
        }
    }
}
