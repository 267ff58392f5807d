//! Lowering: parsed Dockerfile + build options → [`BuildGraph`].
//!
//! Stages are lowered on demand, starting from the target, so only the stages the target
//! needs end up in the graph (`FROM <stage>`, `COPY --from`, `RUN --mount=from=`). A stage
//! reached again while it is being lowered is a cycle.
//!
//! The driver lives here; each instruction family has its own module, as BuildKit splits
//! its conversion: [`stage`] (FROM, named contexts, `--from` sources), [`arg`] (global and
//! stage ARGs), [`config`] (ENV, LABEL, WORKDIR, USER, CMD, HEALTHCHECK, ...), [`run`] (RUN
//! and its mounts) and [`copy`] (COPY and ADD). Flags reach lowering only through the parser
//! crate's typed instructions ([`kiln_dockerfile::instructions::lower`], which checks them
//! against its one allow-list, [`kiln_dockerfile::instructions::accepted_flags`]): values
//! come unexpanded, and lowering expands those the allow-list marks as expanded, with the
//! stage's ARG/ENV scope. A flag mistake arrives as a structured
//! [`FlagError`](kiln_dockerfile::error::FlagError) that [`flag_error_message`] words.

mod arg;
mod config;
mod copy;
mod run;
mod stage;

use std::collections::{BTreeMap, BTreeSet};

use kiln_dockerfile::error::{FlagError, FlagErrorKind};
#[cfg(doc)]
use kiln_dockerfile::instructions::accepted_flags;
use kiln_dockerfile::instructions::{
    flag_spec, Command, FlagExpansion, TypedInstruction, COPY_FROM_VARIABLE,
};
use kiln_dockerfile::shell::Lexer;
use kiln_dockerfile::{Args, Dockerfile, Instruction, Keyword, ParseError, Span};
use serde::Serialize;

use crate::error::FrontendError;
use crate::graph::*;
use crate::options::{BuildOptions, NamedContext, NoCache};
use crate::platform::Platform;
use crate::reference::normalize_reference;
use crate::resolver::ImageConfigResolver;
use crate::stages::{description_of, keyword_span, split_stages, StageDecl, Typed};
use kiln_oci::{ContainerConfig, History};

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
        for (inst, typed) in st.instructions.iter().zip(&st.typed) {
            check_instruction_shape(inst, typed)?;
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
    let mut t = low.results.remove(target);
    // `--label` / `--opt label:K=V`: the built image's labels, over the Dockerfile's LABELs.
    if !opts.labels.is_empty() {
        t.config
            .runtime_mut()
            .labels
            .get_or_insert_default()
            .extend(opts.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
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
    /// values in order. Only `env` is used; a `ContainerConfig` gives its set/get helpers.
    env: ContainerConfig,
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
            .runtime()
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
        env.env.unwrap_or_default()
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

    /// The value of flag `name` of `t` expanded with `lookup`, or `None` without the flag.
    /// The typed layer has already refused what the flag's [`FlagExpansion`] forbids
    /// (`COPY --from` with a variable); only flags marked for expansion come here.
    fn expand_flag(
        &self,
        t: &TypedInstruction,
        name: &str,
        value: Option<&String>,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<String>, FrontendError> {
        let Some(value) = value else { return Ok(None) };
        let span = t.flag(name).map_or(t.span, |f| f.span);
        self.expand(value, span, lookup).map(Some)
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
        // An instruction that does not type is reported when the stage is lowered.
        for t in decl.typed.iter().flatten() {
            // Values without variables only, in the order the flags are written.
            let froms: Vec<&str> = match &t.command {
                Command::Copy(c) => c.from.iter().map(String::as_str).collect(),
                Command::Run(r) => r
                    .mounts
                    .iter()
                    .filter(|m| !m.written.contains('$'))
                    .filter_map(|m| m.from.as_deref())
                    .collect(),
                _ => Vec::new(),
            };
            for from in froms.into_iter().filter(|v| !v.contains('$')) {
                if let Some(d) = by_name(from).filter(|&d| d != idx) {
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
        st.config.history.push(History {
            created_by: Some(created_by),
            empty_layer,
            ..History::default()
        });
    }

    /// Lowers one instruction; `typed` is what the parser crate's typed layer made of it.
    fn lower_instruction(
        &mut self,
        st: &mut StageState,
        inst: &Instruction,
        typed: &Typed,
        at: Option<Span>,
    ) -> Result<(), FrontendError> {
        let span = at.unwrap_or(inst.span);
        let kind = check_instruction_shape(inst, typed)?;
        // RUN, COPY and ADD are lowered from their typed form only; other instructions read
        // their arguments (HEALTHCHECK its flags from `typed`, in `config`).
        let command = || match typed {
            Ok(t) => Ok(t),
            Err(e) => Err(word_parse_error(e, inst)),
        };
        match kind {
            Keyword::From => unreachable_from(span),
            Keyword::Arg => self.lower_arg(st, inst, span),
            Keyword::Run => match &command()?.command {
                Command::Run(run) => self.lower_run(st, inst, command()?, run, at),
                _ => Err(typed_mismatch(inst)),
            },
            Keyword::Copy | Keyword::Add => match &command()?.command {
                Command::Copy(c) | Command::Add(c) => {
                    self.lower_copy(st, inst, command()?, c, at, kind == Keyword::Add)
                }
                _ => Err(typed_mismatch(inst)),
            },
            _ => self.lower_config(st, inst, typed, kind, at),
        }
    }
}

fn unreachable_from(span: Span) -> Result<(), FrontendError> {
    Err(FrontendError::new(
        "FROM inside a stage body (internal error: stages were split wrongly)",
        span,
    ))
}

fn typed_mismatch(inst: &Instruction) -> FrontendError {
    FrontendError::new(
        format!(
            "{} was typed as another instruction (internal error)",
            inst.name()
        ),
        inst.span,
    )
}

/// A typed-layer error in the frontend's words: a flag mistake through
/// [`flag_error_message`], anything else as the parser words it.
pub(crate) fn word_parse_error(e: &ParseError, inst: &Instruction) -> FrontendError {
    match &e.flag {
        // A repeated flag is reported where it is first given.
        Some(f) => match f.kind {
            FlagErrorKind::Duplicate { first } => {
                FrontendError::new(flag_error_message(f, inst), first)
            }
            _ => FrontendError::new(flag_error_message(f, inst), f.span),
        },
        None => FrontendError::new(e.message.clone(), e.span),
    }
}

/// How the frontend words a flag mistake the parser crate found (the parser words the same
/// [`FlagError`] as BuildKit does, in [`ParseError::message`]).
pub(crate) fn flag_error_message(f: &FlagError, inst: &Instruction) -> String {
    let v = &f.value;
    // Flags read as written say so when a `$` in them was meant as a variable.
    let literal = inst
        .kind()
        .and_then(|k| flag_spec(k, &f.flag))
        .is_some_and(|spec| spec.expansion == FlagExpansion::AsWritten);
    let as_written = if literal && v.contains('$') {
        " (variables are not expanded in this flag)"
    } else {
        ""
    };
    match &f.kind {
        FlagErrorKind::Unknown => format!("unknown flag: --{} for {}", f.flag, inst.name()),
        FlagErrorKind::Duplicate { .. } => format!("flag --{} is given more than once", f.flag),
        FlagErrorKind::MissingValue => {
            format!("flag --{} needs a value: --{}=<value>", f.flag, f.flag)
        }
        FlagErrorKind::NotBoolean => {
            format!("--{}={v}: expected true or false{as_written}", f.flag)
        }
        FlagErrorKind::NetworkMode => {
            format!("unsupported network mode {v:?}: expected default, none or host{as_written}")
        }
        FlagErrorKind::SecurityMode => {
            format!("unsupported security mode {v:?}: expected sandbox or insecure{as_written}")
        }
        FlagErrorKind::Chmod => {
            format!("invalid chmod value {v:?}: expected octal like 0755 or symbolic like u+x")
        }
        FlagErrorKind::FromVariable => COPY_FROM_VARIABLE.to_string(),
        FlagErrorKind::Mount(reason) => mount_error_message(v, reason),
        FlagErrorKind::Healthcheck if f.flag == "retries" => {
            format!("--retries: {v:?} is not a whole number")
        }
        FlagErrorKind::Healthcheck => {
            format!("--{}: {v:?} is not a duration like 30s or 1m30s", f.flag)
        }
        FlagErrorKind::HealthcheckTooShort => {
            format!(
                "--{}: {v:?} is shorter than 1ms: give 0 for the default or at least 1ms",
                f.flag
            )
        }
        FlagErrorKind::HealthcheckNone => {
            format!("HEALTHCHECK NONE takes no flags (--{} is given)", f.flag)
        }
    }
}

/// How the frontend words a `--mount` value the mount parser refuses.
pub(super) fn mount_error_message(written: &str, reason: &str) -> String {
    if reason.starts_with("unsupported mount type") {
        format!("--mount={written}: {reason}: expected bind, cache, tmpfs, secret or ssh")
    } else {
        format!("--mount={written}: {reason}")
    }
}

fn input_of(v: Option<VertexId>) -> (Option<InputIndex>, Vec<VertexId>) {
    match v {
        Some(id) => (Some(0), vec![id]),
        None => (None, vec![]),
    }
}

/// Checks what BuildKit checks when it parses an instruction, before anything is built: a
/// known keyword, flags it accepts ([`accepted_flags`]: each once, but lists such as
/// `--mount`/`--exclude`), and COPY/ADD with a destination. BuildKit does this for every
/// stage, so an error in a stage the target does not need still fails the build. `typed` is
/// the typed layer's verdict on `inst`; its other mistakes (a bad value) are reported when
/// the instruction is lowered.
fn check_instruction_shape(inst: &Instruction, typed: &Typed) -> Result<Keyword, FrontendError> {
    let kind = inst.kind().ok_or_else(|| {
        FrontendError::new(Keyword::unknown_message(&inst.keyword), keyword_span(inst))
    })?;
    if let Err(ParseError { flag: Some(f), .. }) = typed {
        if matches!(
            f.kind,
            FlagErrorKind::Unknown | FlagErrorKind::Duplicate { .. }
        ) {
            if let Err(e) = typed {
                return Err(word_parse_error(e, inst));
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolver::OfflineResolver;

    fn lower_src(src: &str) -> Result<BuildGraph, FrontendError> {
        let df = kiln_dockerfile::parse(src).expect("parses");
        lower(
            &df,
            &BuildOptions::for_context("ctx"),
            &[],
            &OfflineResolver,
        )
    }

    #[test]
    fn one_flag_mistake_is_worded_by_each_layer_at_the_same_place() {
        let src = "FROM scratch\nRUN --network=bridge true\n";
        let df = kiln_dockerfile::parse(src).expect("parses");
        let parsed = kiln_dockerfile::instructions::lower(&df.instructions[1]).unwrap_err();
        let f = parsed.flag.clone().expect("a flag error");
        assert_eq!(f.kind, FlagErrorKind::NetworkMode);
        assert_eq!((f.flag.as_str(), f.value.as_str()), ("network", "bridge"));
        assert_eq!(parsed.message, "invalid network mode \"bridge\"");
        let e = lower_src(src).unwrap_err();
        assert_eq!(
            e.to_string(),
            "2:5: unsupported network mode \"bridge\": expected default, none or host"
        );
        assert_eq!(e.span, Some(parsed.span));
    }

    #[test]
    fn a_repeated_flag_is_reported_where_it_is_first_given() {
        let e = lower_src("FROM scratch\nCOPY --chown=1 --chown=2 a /b\n").unwrap_err();
        assert_eq!(e.to_string(), "2:6: flag --chown is given more than once");
    }

    #[test]
    fn a_flag_mistake_in_a_stage_the_target_does_not_need_waits_until_it_is_lowered() {
        // The value is wrong, not the shape: only the stage that uses it fails.
        let src = "FROM scratch AS unused\nRUN --network=bridge true\nFROM scratch\nENV A=1\n";
        assert!(lower_src(src).is_ok());
        let e = lower_src("FROM scratch AS unused\nRUN --bogus true\nFROM scratch\n").unwrap_err();
        assert_eq!(e.to_string(), "2:5: unknown flag: --bogus for RUN");
    }

    #[test]
    fn healthcheck_durations_and_retries_come_from_the_typed_instruction() {
        let g = lower_src("FROM scratch\nHEALTHCHECK --interval=1m30s --retries=2 CMD true\n")
            .expect("lowers");
        let hc = g.stages[g.target]
            .config
            .runtime()
            .healthcheck
            .clone()
            .expect("a health check");
        assert_eq!((hc.interval, hc.retries), (Some(90_000_000_000), Some(2)));
        let e = lower_src("FROM scratch\nHEALTHCHECK --timeout=10us CMD true\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "2:13: --timeout: \"10us\" is shorter than 1ms: give 0 for the default or at least 1ms"
        );
        let e = lower_src("FROM scratch\nHEALTHCHECK --retries=-1 CMD true\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "2:13: --retries: \"-1\" is not a whole number"
        );
    }
}
