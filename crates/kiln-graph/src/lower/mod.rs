//! Lowering: parsed Dockerfile + build options → [`BuildGraph`].
//!
//! Stages are lowered on demand, starting from the target, so only the stages the target
//! needs end up in the graph (`FROM <stage>`, `COPY --from`, `RUN --mount=from=`). A stage
//! reached again while it is being lowered is a cycle.
//!
//! The driver lives here; each instruction family has its own module, as BuildKit splits
//! its conversion: [`stage`] (FROM, named contexts, `--from` sources), [`arg`] (global and
//! stage ARGs), [`config`] (ENV, LABEL, WORKDIR, USER, CMD, HEALTHCHECK, ...), [`run`] (RUN
//! and its mounts) and [`copy`] (COPY and ADD). Flags are accepted and expanded as the
//! parser crate's one allow-list says ([`kiln_dockerfile::instructions::accepted_flags`]).

mod arg;
mod config;
mod copy;
mod run;
mod stage;

use std::collections::{BTreeMap, BTreeSet};

#[cfg(doc)]
use kiln_dockerfile::instructions::accepted_flags;
use kiln_dockerfile::instructions::{
    flag_spec, from_has_variable, parse_mount, FlagExpansion, FlagKind, COPY_FROM_VARIABLE,
};
use kiln_dockerfile::shell::Lexer;
use kiln_dockerfile::{Args, Dockerfile, Flag, Instruction, Keyword, Span};
use serde::Serialize;

use crate::error::FrontendError;
use crate::graph::*;
use crate::options::{BuildOptions, NamedContext, NoCache};
use crate::platform::Platform;
use crate::reference::normalize_reference;
use crate::resolver::ImageConfigResolver;
use crate::stages::{description_of, keyword_span, split_stages, StageDecl};

/// Most characters all expanded values of one lowering may add up to (ARG, ENV, LABEL, COPY
/// arguments, flag values and the environment of every RUN). Each word is also capped by the
/// lexer ([`kiln_dockerfile::shell::MAX_EXPANDED_CHARS`]); this bounds many words that each
/// stay under that cap, so a small Dockerfile cannot make `--dry-run` hold gigabytes.
const MAX_EXPANDED_TOTAL: usize = 64 << 20;

/// Lowers `df` for `opts` into a build graph pruned to the target.
/// `dockerignore` holds the `.dockerignore` patterns of the main context, in file order.
pub fn lower(
    df: &Dockerfile,
    opts: &BuildOptions,
    dockerignore: &[String],
    resolver: &dyn ImageConfigResolver,
) -> Result<BuildGraph, FrontendError> {
    lower_with_outline(df, opts, dockerignore, resolver).map(|(g, _)| g)
}

/// The build args and secrets a target uses (`--call outline`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Outline {
    /// The target stage's name (or `stage-N`).
    pub target: String,
    /// Its description comment.
    pub description: String,
    /// ARGs declared by the needed stages, and global ARGs they use, in declaration order.
    pub args: Vec<ArgInfo>,
    /// Secrets mounted by RUN steps.
    pub secrets: Vec<SecretInfo>,
    /// SSH agents mounted by RUN steps.
    pub ssh: Vec<SecretInfo>,
}

/// One build arg in an outline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArgInfo {
    /// Name.
    pub name: String,
    /// Default as written in the Dockerfile, if any.
    pub default: Option<String>,
    /// The value it gets in this build (build arg, default or global value).
    pub value: Option<String>,
    /// The comment block above the ARG.
    pub description: String,
    /// Line of the declaration.
    pub line: usize,
}

/// One secret (or SSH agent) in an outline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretInfo {
    /// Id.
    pub id: String,
    /// The build fails without it.
    pub required: bool,
    /// First line that mounts it.
    pub line: usize,
}

/// Lowers and also returns the target's outline.
pub fn lower_with_outline(
    df: &Dockerfile,
    opts: &BuildOptions,
    dockerignore: &[String],
    resolver: &dyn ImageConfigResolver,
) -> Result<(BuildGraph, Outline), FrontendError> {
    let split = split_stages(df)?;
    let target_platform = opts
        .platforms
        .first()
        .cloned()
        .unwrap_or_else(Platform::host);
    let build_platform = Platform::host();
    let mut builtins = BTreeMap::new();
    for (prefix, p) in [("TARGET", &target_platform), ("BUILD", &build_platform)] {
        builtins.insert(format!("{prefix}PLATFORM"), p.to_string());
        builtins.insert(format!("{prefix}OS"), p.os.clone());
        builtins.insert(format!("{prefix}ARCH"), p.architecture.clone());
        builtins.insert(
            format!("{prefix}VARIANT"),
            p.variant.clone().unwrap_or_default(),
        );
    }
    let mut low = Lowerer {
        opts,
        dockerignore,
        resolver,
        lexer: Lexer::new(df.escape),
        df_escape: df.escape,
        stages: split.stages,
        globals: Vec::new(),
        builtins,
        target_platform,
        vertices: Vec::new(),
        results: Vec::new(),
        state: Vec::new(),
        context_vertex: None,
        stage_index: BTreeMap::new(),
        pending: None,
        outline_args: Vec::new(),
        secrets: Vec::new(),
        ssh: Vec::new(),
        expanded_total: std::cell::Cell::new(0),
    };
    low.state = vec![Visit::New; low.stages.len()];
    // A name defined twice means its last stage for `COPY --from` and `--target`, as in
    // BuildKit (docker/buildx's own Dockerfile redefines stages this way).
    for st in low.stages.iter() {
        if let Some(n) = &st.name {
            low.stage_index.insert(n.clone(), st.index);
        }
    }
    for st in &low.stages {
        for inst in &st.instructions {
            check_instruction_shape(inst)?;
        }
    }
    low.eval_globals(&split.globals)?;

    let target_idx = match &opts.target {
        None => low.stages.len() - 1,
        Some(t) => {
            let lower = t.to_ascii_lowercase();
            match low
                .stages
                .iter()
                .rev()
                .find(|s| s.name.as_deref() == Some(lower.as_str()))
            {
                Some(s) => s.index,
                None => {
                    let names: Vec<String> =
                        low.stages.iter().filter_map(|s| s.name.clone()).collect();
                    return Err(FrontendError::global(format!(
                        "target stage {t:?} could not be found; stages are: {}",
                        if names.is_empty() {
                            "(none named)".to_string()
                        } else {
                            names.join(", ")
                        }
                    )));
                }
            }
        }
    };
    low.lower_target(target_idx)?;
    low.results.sort_by_key(|r| r.index);
    let target = low
        .results
        .iter()
        .position(|r| r.index == target_idx)
        .unwrap_or(0);
    // The target is last in the Dockerfile-ordered list only if no later stage is needed;
    // keep it simple for consumers: move it to the end.
    let t = low.results.remove(target);
    low.results.push(t);
    let target = low.results.len() - 1;
    let decl = &low.stages[target_idx];
    // Declaration order, independent of the order stages happened to be lowered in.
    low.outline_args.sort_by_key(|a| a.line);
    low.secrets.sort_by_key(|s| s.line);
    low.ssh.sort_by_key(|s| s.line);
    let outline = Outline {
        target: decl.display_name(),
        description: description_of(decl.from),
        args: low.outline_args,
        secrets: low.secrets,
        ssh: low.ssh,
    };
    Ok((
        BuildGraph {
            vertices: low.vertices,
            stages: low.results,
            target,
        },
        outline,
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Visit {
    New,
    InProgress,
    Done(usize),
}

struct Lowerer<'a> {
    opts: &'a BuildOptions,
    dockerignore: &'a [String],
    resolver: &'a dyn ImageConfigResolver,
    lexer: Lexer,
    /// The Dockerfile's escape character.
    df_escape: char,
    stages: Vec<StageDecl<'a>>,
    /// Global ARGs: name, value (None = declared without value), default text, line, description.
    globals: Vec<GlobalArg>,
    builtins: BTreeMap<String, String>,
    target_platform: Platform,
    vertices: Vec<Vertex>,
    results: Vec<StageResult>,
    state: Vec<Visit>,
    context_vertex: Option<VertexId>,
    /// First stage index for each stage name.
    stage_index: BTreeMap<String, usize>,
    /// A stage a body needs before it can be lowered (see [`Lowerer::lower_target`]).
    pending: Option<usize>,
    outline_args: Vec<ArgInfo>,
    secrets: Vec<SecretInfo>,
    ssh: Vec<SecretInfo>,
    /// Characters produced by expansion so far (see [`MAX_EXPANDED_TOTAL`]).
    expanded_total: std::cell::Cell<usize>,
}

#[derive(Debug, Clone)]
struct GlobalArg {
    name: String,
    value: Option<String>,
    default: Option<String>,
    line: usize,
    description: String,
}

/// The state of a stage while its instructions are lowered.
struct StageState {
    display: String,
    index: usize,
    root: Option<VertexId>,
    config: ImageConfig,
    /// The build state's env (expansion and RUN): starts as the image env, then ENV and ARG
    /// values in order. Only `env` is used; an `ImageConfig` gives its set/get helpers.
    env: ImageConfig,
    /// Declared ARGs in scope, with their values.
    args: Vec<(String, Option<String>)>,
    cmd_set: bool,
    step: usize,
    total: usize,
    platform: Platform,
    ignore_cache: bool,
}

impl StageState {
    /// Expansion sees the build state's env: ENV and ARG values, the later one winning.
    fn lookup(&self, name: &str) -> Option<String> {
        self.env.env_get(name).map(String::from)
    }

    fn shell(&self) -> Vec<String> {
        self.config
            .shell
            .clone()
            .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()])
    }

    /// Environment for RUN: the build state's env (image env, then ENV and ARG values in
    /// the order they were set, a later one replacing an earlier one in place), then proxy
    /// build args not already set.
    fn run_env(&self, proxies: &[(String, String)]) -> Vec<String> {
        let mut env = self.env.clone();
        for (k, v) in proxies {
            if env.env_get(k).is_none() {
                env.env_set(k, v);
            }
        }
        env.env
    }
}

/// The lexer's message, with a word longer than a line shortened so the error stays readable.
fn expand_error_message(e: &kiln_dockerfile::shell::ExpandError) -> String {
    const SHOWN: usize = 120;
    if e.word.chars().count() <= SHOWN {
        return e.to_string();
    }
    let head: String = e.word.chars().take(SHOWN).collect();
    format!("failed to process {head:?}...: {}", e.reason)
}

fn source_span(s: Span) -> SourceSpan {
    SourceSpan {
        start_line: s.start.line as u32,
        start_col: s.start.column as u32,
        end_line: s.end.line as u32,
    }
}

fn counts_as_step(inst: &Instruction) -> bool {
    matches!(
        inst.kind(),
        Some(Keyword::Run | Keyword::Copy | Keyword::Add | Keyword::Workdir)
    )
}

impl<'a> Lowerer<'a> {
    fn push(&mut self, op: Op, inputs: Vec<VertexId>, meta: VertexMeta) -> VertexId {
        let id = VertexId(self.vertices.len() as u32);
        self.vertices.push(Vertex { op, inputs, meta });
        id
    }

    fn expand(
        &self,
        word: &str,
        span: Span,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<String, FrontendError> {
        if self.is_plain(word) {
            return Ok(word.to_string());
        }
        let v = self
            .lexer
            .process_word(word, lookup)
            .map_err(|e| FrontendError::new(expand_error_message(&e), span))?;
        self.count_expanded(v.len(), span)?;
        Ok(v)
    }

    /// Adds `len` characters to the lowering's expansion total; fails past
    /// [`MAX_EXPANDED_TOTAL`], naming the instruction that crossed it.
    fn count_expanded(&self, len: usize, span: Span) -> Result<(), FrontendError> {
        let total = self.expanded_total.get().saturating_add(len);
        self.expanded_total.set(total);
        if total > MAX_EXPANDED_TOTAL {
            return Err(FrontendError::new(
                format!(
                    "variables expand to more than {} MiB in total by this instruction (kiln's \
                     limit for one build; values that repeat other values multiply in size)",
                    MAX_EXPANDED_TOTAL >> 20
                ),
                span,
            ));
        }
        Ok(())
    }

    /// A word with no variable, quote or escape expands to itself (the common case).
    fn is_plain(&self, word: &str) -> bool {
        !word.contains(['$', '\'', '"', self.df_escape]) && !word.starts_with('\u{feff}')
    }

    fn expand_words(
        &self,
        word: &str,
        span: Span,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<String>, FrontendError> {
        if self.is_plain(word) {
            return Ok(word.split_whitespace().map(String::from).collect());
        }
        let words = self
            .lexer
            .process_words(word, lookup)
            .map_err(|e| FrontendError::new(expand_error_message(&e), span))?;
        self.count_expanded(words.iter().map(String::len).sum(), span)?;
        Ok(words)
    }

    /// The value of flag `f` of a `kind` instruction as lowering uses it: expanded with
    /// `lookup` or kept as written, as the parser crate's allow-list decides for that flag
    /// ([`FlagExpansion`]). `--mount` values come back as written: the mount parser expands
    /// them field by field.
    fn flag_value(
        &self,
        kind: Keyword,
        f: &Flag,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<String, FrontendError> {
        let raw = f.value.as_deref().unwrap_or("");
        match flag_spec(kind, &f.name).map(|spec| spec.expansion) {
            Some(FlagExpansion::Expanded) => self.expand(raw, f.span, lookup),
            Some(FlagExpansion::NoVariables) => {
                if from_has_variable(raw) {
                    return Err(FrontendError::new(COPY_FROM_VARIABLE, f.span));
                }
                self.expand(raw, f.span, lookup)
            }
            Some(FlagExpansion::PerField | FlagExpansion::AsWritten) | None => Ok(raw.to_string()),
        }
    }

    /// Whether flag `f` of a `kind` instruction is read as written, so a `$` in it is a
    /// literal character (error messages say so).
    fn flag_is_literal(kind: Keyword, f: &Flag) -> bool {
        flag_spec(kind, &f.name).is_some_and(|spec| spec.expansion == FlagExpansion::AsWritten)
    }

    fn global_lookup(&self) -> impl Fn(&str) -> Option<String> + '_ {
        move |name: &str| {
            if let Some(g) = self.globals.iter().rev().find(|g| g.name == name) {
                return g.value.clone();
            }
            self.builtins.get(name).cloned()
        }
    }

    /// Lowers stage `idx` (once) and returns its index in `results`.
    /// Lowers the target and, first, every stage it needs. Iterative so that long chains of
    /// stages cannot exhaust the stack: a stage that meets an unlowered dependency is rolled
    /// back, the dependency is lowered, and the stage is tried again.
    fn lower_target(&mut self, target: usize) -> Result<(), FrontendError> {
        let mut stack = vec![target];
        self.state[target] = Visit::InProgress;
        while let Some(&idx) = stack.last() {
            // Lower the dependencies visible without expansion first; the rollback below
            // only handles those that come from expanded values.
            // The stack is always a path (each stage needs the one above it), so a stage
            // met again while on it is a real cycle; hence one dependency at a time.
            if let Some(d) = self
                .literal_deps(idx)
                .into_iter()
                .find(|&d| self.state[d] == Visit::New)
            {
                self.state[d] = Visit::InProgress;
                stack.push(d);
                continue;
            }
            let checkpoint = (
                self.vertices.len(),
                self.outline_args.len(),
                self.secrets.len(),
                self.ssh.len(),
            );
            match self.lower_stage_body(idx) {
                Ok(result) => {
                    self.results.push(result);
                    self.state[idx] = Visit::Done(self.results.len() - 1);
                    stack.pop();
                }
                Err(e) => {
                    let Some(dep) = self.pending.take() else {
                        return Err(e);
                    };
                    self.vertices.truncate(checkpoint.0);
                    self.outline_args.truncate(checkpoint.1);
                    self.secrets.truncate(checkpoint.2);
                    self.ssh.truncate(checkpoint.3);
                    if self
                        .context_vertex
                        .is_some_and(|c| c.index() >= checkpoint.0)
                    {
                        self.context_vertex = None;
                    }
                    self.state[dep] = Visit::InProgress;
                    stack.push(dep);
                }
            }
        }
        Ok(())
    }

    /// Stages that stage `idx` names literally: its FROM (after global ARG expansion),
    /// `COPY --from=` and `RUN --mount=...from=` values without variables.
    fn literal_deps(&self, idx: usize) -> Vec<usize> {
        let decl = &self.stages[idx];
        let mut deps = Vec::new();
        let by_name = |n: &str| {
            let lower = n.to_ascii_lowercase();
            self.stage_index.get(&lower).copied().or_else(|| {
                lower
                    .parse::<usize>()
                    .ok()
                    .filter(|&i| i < self.stages.len())
            })
        };
        if let Ok(base) = self.lexer.process_word(&decl.base, &self.global_lookup()) {
            if let Some(b) = self.earlier_stage_named(&base.to_ascii_lowercase(), idx) {
                deps.push(b);
            }
        }
        for inst in &decl.instructions {
            for f in &inst.flags {
                let Some(v) = f.value.as_deref().filter(|v| !v.contains('$')) else {
                    continue;
                };
                // A mount that does not parse is reported when the stage is lowered.
                let from = match f.name.as_str() {
                    "from" => Some(v.to_string()),
                    "mount" => parse_mount(v).ok().and_then(|m| m.from),
                    _ => None,
                };
                if let Some(d) = from.as_deref().and_then(by_name).filter(|&d| d != idx) {
                    deps.push(d);
                }
            }
        }
        deps
    }

    /// The result index of stage `idx` if it is lowered. Otherwise records it as pending and
    /// fails, so that [`Self::lower_target`] lowers it first; a stage that is already in
    /// progress is a cycle, reported at `by` (the reference that closes it).
    fn lower_stage(&mut self, idx: usize, by: Option<Span>) -> Result<usize, FrontendError> {
        match self.state[idx] {
            Visit::Done(r) => Ok(r),
            Visit::InProgress => {
                let name = self.stages[idx].display_name();
                Err(FrontendError {
                    message: format!("circular dependency detected on stage: {name}"),
                    span: by.or(Some(self.stages[idx].from.span)),
                })
            }
            Visit::New => {
                self.pending = Some(idx);
                Err(FrontendError::global(format!(
                    "stage {} is not lowered yet",
                    self.stages[idx].display_name()
                )))
            }
        }
    }

    fn step_meta(&self, st: &mut StageState, inst: &Instruction, at: Option<Span>) -> VertexMeta {
        st.step += 1;
        let text = inst
            .original
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        VertexMeta {
            description: format!("[{} {}/{}] {}", st.display, st.step, st.total, text),
            stage: Some(st.display.clone()),
            span: Some(source_span(at.unwrap_or(inst.span))),
            ignore_cache: st.ignore_cache,
        }
    }

    fn history(st: &mut StageState, created_by: String, empty_layer: bool) {
        st.config.history.push(HistoryEntry {
            created_by,
            empty_layer,
            comment: None,
        });
    }

    fn lower_instruction(
        &mut self,
        st: &mut StageState,
        inst: &Instruction,
        at: Option<Span>,
    ) -> Result<(), FrontendError> {
        let span = at.unwrap_or(inst.span);
        let kind = check_instruction_shape(inst)?;
        match kind {
            Keyword::From => unreachable_from(span),
            Keyword::Arg => self.lower_arg(st, inst, span),
            Keyword::Run => self.lower_run(st, inst, at),
            Keyword::Copy | Keyword::Add => self.lower_copy(st, inst, at, kind == Keyword::Add),
            _ => self.lower_config(st, inst, kind, at),
        }
    }
}

fn unreachable_from(span: Span) -> Result<(), FrontendError> {
    Err(FrontendError::new(
        "FROM inside a stage body (internal error: stages were split wrongly)",
        span,
    ))
}

fn input_of(v: Option<VertexId>) -> (Option<InputIndex>, Vec<VertexId>) {
    match v {
        Some(id) => (Some(0), vec![id]),
        None => (None, vec![]),
    }
}

/// Checks what BuildKit checks when it parses an instruction, before anything is built: a
/// known keyword, flags it accepts ([`accepted_flags`]: each once, but lists such as
/// `--mount`/`--exclude`), and COPY/ADD
/// with a destination. BuildKit does this for every stage, so an error in a stage the
/// target does not need still fails the build.
fn check_instruction_shape(inst: &Instruction) -> Result<Keyword, FrontendError> {
    let kind = inst.kind().ok_or_else(|| {
        FrontendError::new(Keyword::unknown_message(&inst.keyword), keyword_span(inst))
    })?;
    for f in &inst.flags {
        let Some(spec) = flag_spec(kind, &f.name) else {
            return Err(FrontendError::new(
                format!("unknown flag: --{} for {}", f.name, inst.name()),
                f.span,
            ));
        };
        let repeatable = spec.kind == FlagKind::List;
        if !repeatable && inst.flags.iter().filter(|g| g.name == f.name).count() > 1 {
            return Err(FrontendError::new(
                format!("flag --{} is given more than once", f.name),
                f.span,
            ));
        }
    }
    if matches!(kind, Keyword::Copy | Keyword::Add) {
        let count = match &inst.args {
            Args::Json(j) => j.values.len(),
            Args::Words(ws) => ws.len(),
            _ => 0,
        };
        if count < 2 {
            return Err(FrontendError::new(
                    format!(
                        "{} requires at least two arguments, but only one was provided. Destination could not be determined",
                        inst.name()
                    ),
                    inst.span,
                ));
        }
    }
    Ok(kind)
}

/// Joins `p` onto `cwd` (when relative) and cleans `.`/`..`, keeping a trailing `/`.
pub(crate) fn resolve_path(cwd: &str, p: &str) -> String {
    let joined = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{}/{}", if cwd.is_empty() { "/" } else { cwd }, p)
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in joined.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            x => parts.push(x),
        }
    }
    let mut out = format!("/{}", parts.join("/"));
    if (p.ends_with('/') || p.ends_with("/.") || p == ".") && out != "/" {
        out.push('/');
    }
    out
}
