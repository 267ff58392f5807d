//! Lowering: parsed Dockerfile + build options → [`BuildGraph`].
//!
//! Stages are lowered on demand, starting from the target, so only the stages the target
//! needs end up in the graph (`FROM <stage>`, `COPY --from`, `RUN --mount=from=`). A stage
//! reached again while it is being lowered is a cycle.

use std::collections::{BTreeMap, BTreeSet};

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

/// `PATH` BuildKit gives Linux stages whose image sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Most characters all expanded values of one lowering may add up to (ARG, ENV, LABEL, COPY
/// arguments, flag values and the environment of every RUN). Each word is also capped by the
/// lexer ([`kiln_dockerfile::shell::MAX_EXPANDED_CHARS`]); this bounds many words that each
/// stay under that cap, so a small Dockerfile cannot make `--dry-run` hold gigabytes.
const MAX_EXPANDED_TOTAL: usize = 64 << 20;

/// Build args that are visible to RUN without an ARG declaration and kept out of history.
const PROXY_ARGS: [&str; 10] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

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

    fn global_lookup(&self) -> impl Fn(&str) -> Option<String> + '_ {
        move |name: &str| {
            if let Some(g) = self.globals.iter().rev().find(|g| g.name == name) {
                return g.value.clone();
            }
            self.builtins.get(name).cloned()
        }
    }

    fn eval_globals(&mut self, globals: &[&'a Instruction]) -> Result<(), FrontendError> {
        for inst in globals {
            for (name, default, span) in arg_decls(inst)? {
                let default_val = match &default {
                    Some(d) => Some(self.expand(d, span, &self.global_lookup())?),
                    None => None,
                };
                let name = self.expand(&name, span, &self.global_lookup())?;
                let value = self
                    .opts
                    .build_args
                    .get(&name)
                    .cloned()
                    .or(default_val)
                    // A bare `ARG V` after `ARG V=1.36` keeps 1.36, as in BuildKit.
                    .or_else(|| {
                        self.globals
                            .iter()
                            .rev()
                            .find(|g| g.name == name)
                            .and_then(|g| g.value.clone())
                    })
                    .or_else(|| self.builtins.get(&name).cloned());
                self.globals.push(GlobalArg {
                    name,
                    value,
                    default,
                    line: inst.span.start.line,
                    description: description_of(inst),
                });
            }
        }
        Ok(())
    }

    fn note_arg(&mut self, info: ArgInfo) {
        if !self.outline_args.iter().any(|a| a.name == info.name) {
            self.outline_args.push(info);
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

    /// The last stage named `lower` (lowercase) defined before stage `idx`.
    fn earlier_stage_named(&self, lower: &str, idx: usize) -> Option<usize> {
        self.stages[..idx.min(self.stages.len())]
            .iter()
            .rev()
            .find(|s| s.name.as_deref() == Some(lower))
            .map(|s| s.index)
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
                let from = match f.name.as_str() {
                    "from" => Some(v),
                    "mount" => v.split(',').find_map(|kv| kv.strip_prefix("from=")),
                    _ => None,
                };
                if let Some(d) = from.and_then(by_name).filter(|&d| d != idx) {
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

    fn lower_stage_body(&mut self, idx: usize) -> Result<StageResult, FrontendError> {
        let decl = self.stages[idx].clone();
        let display = decl.display_name();
        let from_span = decl.from.span;
        let ignore_cache = match &self.opts.no_cache {
            NoCache::None => false,
            NoCache::All => true,
            NoCache::Stages(s) => s.iter().any(|x| {
                let x = x.to_ascii_lowercase();
                Some(&x) == decl.name.as_ref() || x == idx.to_string()
            }),
        };

        // Named context replacing the whole stage.
        if let Some(name) = &decl.name {
            if let Some(nc) = self.opts.named_contexts.get(name).cloned() {
                let (root, config) = self.named_context_source(
                    name,
                    &nc,
                    &display,
                    Some(display.clone()),
                    from_span,
                )?;
                return Ok(StageResult {
                    index: idx,
                    name: decl.name.clone(),
                    root,
                    config,
                    platform: self.target_platform.clone(),
                });
            }
        }

        // FROM: expand base and platform with the global ARGs and built-ins.
        // Global ARGs this FROM line really references (not built-ins) go into the outline.
        let mut referenced = BTreeSet::new();
        for word in std::iter::once(&decl.base).chain(decl.platform.as_ref()) {
            if let Ok(e) = self.lexer.expand(word, &self.global_lookup()) {
                referenced.extend(e.used);
                referenced.extend(e.unset);
            }
        }
        for g in &self.globals.clone() {
            if referenced.contains(&g.name) && !self.builtins.contains_key(&g.name) {
                self.note_arg(ArgInfo {
                    name: g.name.clone(),
                    default: g.default.clone(),
                    value: g.value.clone(),
                    description: g.description.clone(),
                    line: g.line,
                });
            }
        }
        let base = self.expand(&decl.base, from_span, &self.global_lookup())?;
        if base.is_empty() {
            return Err(FrontendError::new(
                format!("base name ({}) should not be blank", decl.base),
                from_span,
            ));
        }
        let platform = match &decl.platform {
            Some(p) => {
                let v = self.expand(p, from_span, &self.global_lookup())?;
                Platform::parse(&v)
                    .map_err(|e| FrontendError::new(format!("FROM --platform: {e}"), from_span))?
            }
            None => self.target_platform.clone(),
        };

        let base_lower = base.to_ascii_lowercase();
        // FROM sees only earlier stages; with duplicate names the last of them wins, as in
        // BuildKit.
        let earlier_stage = self.earlier_stage_named(&base_lower, idx);
        // Step counters as BuildKit numbers them: FROM is a step only when it pulls an image
        // (or a named context), never for `FROM <stage>` or `FROM scratch`.
        let from_step = usize::from(earlier_stage.is_none() && base != "scratch");
        let mut total = from_step
            + decl
                .instructions
                .iter()
                .filter(|i| counts_as_step(i))
                .count();
        let (root, mut config) = if let Some(b) = earlier_stage {
            let r = self.lower_stage(b, Some(from_span))?;
            (self.results[r].root, self.results[r].config.clone())
        } else if let Some(nc) = self.opts.named_contexts.get(&base).cloned().or_else(|| {
            let norm = normalize_reference(&base).ok()?;
            self.opts
                .named_contexts
                .iter()
                .find(|(k, _)| normalize_reference(k).ok().as_ref() == Some(&norm))
                .map(|(_, v)| v.clone())
        }) {
            let desc = format!("[{display} 1/{total}] FROM {base}");
            self.named_context_source(&base, &nc, &desc, Some(display.clone()), from_span)?
        } else if base == "scratch" {
            (None, ImageConfig::default())
        } else {
            let reference =
                normalize_reference(&base).map_err(|e| FrontendError::new(e, from_span))?;
            let resolved = self
                .resolver
                .resolve_image_config(&reference, &platform)
                .map_err(|e| FrontendError::new(e.to_string(), from_span))?;
            let id = self.push(
                Op::Image(ImageSource {
                    reference: reference.clone(),
                    platform: platform.clone(),
                    digest: resolved.digest.clone(),
                }),
                vec![],
                VertexMeta {
                    description: format!("[{display} 1/{total}] FROM {reference}"),
                    stage: Some(display.clone()),
                    span: Some(source_span(from_span)),
                    ignore_cache,
                },
            );
            (Some(id), resolved.config)
        };
        if config.os.is_empty() {
            config.os = platform.os.clone();
            config.architecture = platform.architecture.clone();
            config.variant = platform.variant.clone();
        }
        if config.env_get("PATH").is_none() && platform.os == "linux" {
            config.env_set("PATH", DEFAULT_PATH);
        }

        // ONBUILD triggers of the base run first, as BuildKit injects them.
        let triggers = std::mem::take(&mut config.on_build);
        let mut parsed_triggers = Vec::new();
        for t in &triggers {
            let df = kiln_dockerfile::parse(t).map_err(|e| {
                FrontendError::new(
                    format!(
                        "invalid ONBUILD trigger {t:?} of the base image: {}",
                        e.message
                    ),
                    from_span,
                )
            })?;
            for inst in df.instructions {
                match inst.kind() {
                    Some(Keyword::From | Keyword::Onbuild | Keyword::Maintainer) | None => {
                        return Err(FrontendError::new(
                            format!(
                                "{} isn't allowed as an ONBUILD trigger (base image trigger {t:?})",
                                inst.name()
                            ),
                            from_span,
                        ))
                    }
                    _ => {}
                }
                if counts_as_step(&inst) {
                    total += 1;
                }
                parsed_triggers.push(inst);
            }
        }

        let mut st = StageState {
            display: display.clone(),
            index: idx,
            root,
            env: ImageConfig {
                env: config.env.clone(),
                ..ImageConfig::default()
            },
            config,
            args: Vec::new(),
            cmd_set: false,
            step: from_step,
            total,
            platform: platform.clone(),
            ignore_cache,
        };
        for inst in &parsed_triggers {
            // Triggers are reported at the FROM line that pulled them in.
            self.lower_instruction(&mut st, inst, Some(from_span))?;
        }
        for inst in &decl.instructions {
            self.lower_instruction(&mut st, inst, None)?;
        }
        Ok(StageResult {
            index: idx,
            name: decl.name.clone(),
            root: st.root,
            config: st.config,
            platform,
        })
    }

    fn named_context_source(
        &mut self,
        name: &str,
        nc: &NamedContext,
        desc: &str,
        stage: Option<String>,
        span: Span,
    ) -> Result<(Option<VertexId>, ImageConfig), FrontendError> {
        let platform = self.target_platform.clone();
        let meta = VertexMeta {
            description: if desc.starts_with('[') {
                desc.to_string()
            } else {
                format!("[{desc}] load build context {name}")
            },
            stage,
            span: Some(source_span(span)),
            ignore_cache: false,
        };
        Ok(match nc {
            NamedContext::Local { .. } => {
                let id = self.push(
                    Op::Local(LocalSource {
                        name: name.to_string(),
                        include: vec![],
                        exclude: vec![],
                    }),
                    vec![],
                    meta,
                );
                (Some(id), ImageConfig::default())
            }
            NamedContext::Image { reference } => {
                let reference = normalize_reference(reference)
                    .map_err(|e| FrontendError::new(format!("build context {name}: {e}"), span))?;
                let resolved = self
                    .resolver
                    .resolve_image_config(&reference, &platform)
                    .map_err(|e| FrontendError::new(e.to_string(), span))?;
                let id = self.push(
                    Op::Image(ImageSource {
                        reference,
                        platform,
                        digest: resolved.digest,
                    }),
                    vec![],
                    meta,
                );
                (Some(id), resolved.config)
            }
            NamedContext::OciLayout { path, reference } => {
                // The resolver reads the layout like a registry: `oci-layout://PATH:TAG` or
                // `oci-layout://PATH@DIGEST`. The digest it finds replaces the tag in the op,
                // so a tag moved to another image changes the cache key.
                let sep = if reference.contains(':') { '@' } else { ':' };
                let layout_ref = format!("oci-layout://{}{sep}{reference}", path.display());
                let resolved = self
                    .resolver
                    .resolve_image_config(&layout_ref, &platform)
                    .map_err(|e| {
                        FrontendError::new(
                            format!(
                                "build context {name}: {} (set with --build-context {name}=oci-layout://... or --opt context:{name}=oci-layout://...)",
                                e.reason
                            ),
                            span,
                        )
                    })?;
                let id = self.push(
                    Op::OciLayout(OciLayoutSource {
                        path: path.display().to_string(),
                        reference: resolved.digest.unwrap_or_else(|| reference.clone()),
                        platform,
                    }),
                    vec![],
                    meta,
                );
                (Some(id), resolved.config)
            }
            NamedContext::Url { url } => {
                let filename = url.rsplit('/').next().unwrap_or("download").to_string();
                let id = self.push(
                    Op::Http(HttpSource {
                        url: url.clone(),
                        checksum: None,
                        filename,
                    }),
                    vec![],
                    meta,
                );
                (Some(id), ImageConfig::default())
            }
        })
    }

    fn context(&mut self) -> VertexId {
        if let Some(c) = self.context_vertex {
            return c;
        }
        let id = self.push(
            Op::Local(LocalSource {
                name: "context".into(),
                include: vec![],
                exclude: self.dockerignore.to_vec(),
            }),
            vec![],
            VertexMeta {
                description: "[internal] load build context".into(),
                stage: None,
                span: None,
                ignore_cache: false,
            },
        );
        self.context_vertex = Some(id);
        id
    }

    /// Resolves `--from=` (COPY) or `from=` (RUN --mount): stage name, stage index, named
    /// context or image. Returns the vertex (None = empty filesystem).
    fn stage_or_image_source(
        &mut self,
        st: &StageState,
        from: &str,
        span: Span,
    ) -> Result<Option<VertexId>, FrontendError> {
        let lower = from.to_ascii_lowercase();
        let by_name = self.stage_index.get(&lower).copied();
        let by_index = if by_name.is_none() {
            from.parse::<usize>().ok()
        } else {
            None
        };
        if let Some(i) = by_index {
            if i >= self.stages.len() {
                return Err(FrontendError::new(
                    format!("invalid from flag value {from}: refers to stage {i}, but the Dockerfile has only {} stages", self.stages.len()),
                    span,
                ));
            }
        }
        if let Some(i) = by_name.or(by_index) {
            if i == st.index {
                return Err(FrontendError::new(
                    format!("circular dependency detected on stage: {}", st.display),
                    span,
                ));
            }
            // BuildKit v0.24 refuses a stage defined later, by name or by index (a cycle is
            // reported as a cycle first).
            if i > st.index && !matches!(self.state[i], Visit::InProgress) {
                return Err(FrontendError::new(
                    format!(
                        "cannot copy from stage \"{from}\", it needs to be defined before current stage \"{}\"",
                        st.display
                    ),
                    span,
                ));
            }
            let r = self.lower_stage(i, Some(span))?;
            return Ok(self.results[r].root);
        }
        if let Some(nc) = self.opts.named_contexts.get(from).cloned() {
            let (root, _) = self.named_context_source(from, &nc, "internal", None, span)?;
            return Ok(root);
        }
        if from == "scratch" {
            return Ok(None);
        }
        let reference = normalize_reference(from).map_err(|e| {
            FrontendError::new(
                format!("--from={from} is neither a stage nor a valid image reference: {e}"),
                span,
            )
        })?;
        let resolved = self
            .resolver
            .resolve_image_config(&reference, &st.platform)
            .map_err(|e| FrontendError::new(e.to_string(), span))?;
        let id = self.push(
            Op::Image(ImageSource {
                reference: reference.clone(),
                platform: st.platform.clone(),
                digest: resolved.digest,
            }),
            vec![],
            VertexMeta {
                description: format!("[internal] load image {reference}"),
                stage: None,
                span: Some(source_span(span)),
                ignore_cache: false,
            },
        );
        Ok(Some(id))
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
            Keyword::Env => {
                let pairs = key_values(inst)?;
                let lookup = |n: &str| st.lookup(n);
                let mut set = Vec::new();
                for (k, v, sp) in pairs {
                    let k = self.expand(&k, sp, &lookup)?;
                    let v = self.expand(&v, sp, &lookup)?;
                    if k.is_empty() {
                        return Err(FrontendError::new("ENV names can not be blank", sp));
                    }
                    set.push((k, v));
                }
                let text = set
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                for (k, v) in set {
                    st.config.env_set(&k, &v);
                    st.env.env_set(&k, &v);
                }
                Self::history(st, format!("ENV {text}"), true);
                Ok(())
            }
            Keyword::Label => {
                let pairs = key_values(inst)?;
                let lookup = |n: &str| st.lookup(n);
                let mut set = Vec::new();
                for (k, v, sp) in pairs {
                    set.push((self.expand(&k, sp, &lookup)?, self.expand(&v, sp, &lookup)?));
                }
                let text = set
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                for (k, v) in set {
                    st.config.labels.insert(k, v);
                }
                Self::history(st, format!("LABEL {text}"), true);
                Ok(())
            }
            Keyword::Workdir => {
                let raw = text_arg(inst).ok_or_else(|| {
                    FrontendError::new("WORKDIR requires exactly one argument", span)
                })?;
                let v = self.expand(&raw, span, &|n| st.lookup(n))?;
                let path = resolve_path(&st.config.working_dir, &v);
                st.config.working_dir = path.clone();
                let meta = self.step_meta(st, inst, at);
                let owner = (!st.config.user.is_empty()).then(|| parse_chown(&st.config.user));
                let (rootfs, inputs) = input_of(st.root);
                st.root = Some(self.push(
                    Op::Mkdir(MkdirOp {
                        rootfs,
                        path: path.clone(),
                        mode: 0o755,
                        owner,
                    }),
                    inputs,
                    meta,
                ));
                Self::history(st, format!("WORKDIR {path}"), false);
                Ok(())
            }
            Keyword::User => {
                let raw = text_arg(inst).ok_or_else(|| {
                    FrontendError::new("USER requires exactly one argument", span)
                })?;
                st.config.user = self.expand(&raw, span, &|n| st.lookup(n))?;
                Self::history(st, format!("USER {}", st.config.user), true);
                Ok(())
            }
            Keyword::Stopsignal => {
                let raw = text_arg(inst).ok_or_else(|| {
                    FrontendError::new("STOPSIGNAL requires exactly one argument", span)
                })?;
                let v = self.expand(&raw, span, &|n| st.lookup(n))?;
                Self::history(st, format!("STOPSIGNAL {v}"), true);
                st.config.stop_signal = Some(v);
                Ok(())
            }
            Keyword::Expose => {
                let mut ports = Vec::new();
                for w in words_of(inst) {
                    for p in self.expand_words(&w, span, &|n| st.lookup(n))? {
                        ports.extend(expose_ports(&p).map_err(|e| FrontendError::new(e, span))?);
                    }
                }
                Self::history(
                    st,
                    format!(
                        "EXPOSE map[{}]",
                        ports
                            .iter()
                            .map(|p| format!("{p}:{{}}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                    true,
                );
                st.config.exposed_ports.extend(ports);
                Ok(())
            }
            Keyword::Volume => {
                let vols = match &inst.args {
                    Args::Json(j) => j
                        .values
                        .iter()
                        .map(|v| self.expand(v, span, &|n| st.lookup(n)))
                        .collect::<Result<Vec<_>, _>>()?,
                    _ => {
                        let mut out = Vec::new();
                        for w in words_of(inst) {
                            out.extend(self.expand_words(&w, span, &|n| st.lookup(n))?);
                        }
                        out
                    }
                };
                if vols.is_empty() || vols.iter().any(|v| v.trim().is_empty()) {
                    return Err(FrontendError::new(
                        "VOLUME specified can not be an empty string",
                        span,
                    ));
                }
                Self::history(st, format!("VOLUME [{}]", vols.join(" ")), true);
                st.config.volumes.extend(vols);
                Ok(())
            }
            Keyword::Cmd | Keyword::Entrypoint => {
                let (cmd, prepend_shell) = command_args(inst);
                let v = if prepend_shell {
                    let mut s = st.shell();
                    s.extend(cmd);
                    s
                } else {
                    cmd
                };
                let shown = if prepend_shell {
                    format!(
                        "[{}]",
                        v.iter()
                            .map(|s| format!("{s:?}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    )
                } else {
                    format!("{v:?}")
                };
                if kind == Keyword::Cmd {
                    Self::history(st, format!("CMD {shown}"), true);
                    st.config.cmd = Some(v);
                    st.cmd_set = true;
                } else {
                    Self::history(st, format!("ENTRYPOINT {shown}"), true);
                    st.config.entrypoint = Some(v);
                    if !st.cmd_set {
                        st.config.cmd = None;
                    }
                }
                Ok(())
            }
            Keyword::Shell => match &inst.args {
                Args::Json(j) if !j.values.is_empty() => {
                    st.config.shell = Some(j.values.clone());
                    Self::history(st, format!("SHELL {:?}", j.values), true);
                    Ok(())
                }
                _ => Err(FrontendError::new(
                    "SHELL requires the arguments to be in JSON form",
                    span,
                )),
            },
            Keyword::Healthcheck => self.lower_healthcheck(st, inst, span),
            Keyword::Onbuild => {
                let Args::Onbuild(child) = &inst.args else {
                    return Err(FrontendError::new("ONBUILD requires an instruction", span));
                };
                match child.kind() {
                    Some(Keyword::Onbuild) => {
                        return Err(FrontendError::new(
                            "chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
                            span,
                        ))
                    }
                    Some(Keyword::From | Keyword::Maintainer) => {
                        return Err(FrontendError::new(
                            format!("{} isn't allowed as an ONBUILD trigger", child.name()),
                            span,
                        ))
                    }
                    _ => {}
                }
                let trigger = inst
                    .original
                    .trim()
                    .split_once(char::is_whitespace)
                    .map(|(_, rest)| rest.trim().to_string())
                    .unwrap_or_default();
                Self::history(st, format!("ONBUILD {trigger}"), true);
                st.config.on_build.push(trigger);
                Ok(())
            }
            Keyword::Maintainer => {
                let v = text_arg(inst).unwrap_or_default();
                Self::history(st, format!("MAINTAINER {v}"), true);
                Ok(())
            }
            Keyword::Run => self.lower_run(st, inst, at),
            Keyword::Copy | Keyword::Add => self.lower_copy(st, inst, at, kind == Keyword::Add),
        }
    }

    fn lower_arg(
        &mut self,
        st: &mut StageState,
        inst: &Instruction,
        span: Span,
    ) -> Result<(), FrontendError> {
        let mut shown = Vec::new();
        for (name, default, sp) in arg_decls(inst)? {
            let lookup = |n: &str| st.lookup(n);
            let name = self.expand(&name, sp, &lookup)?;
            let default_val = match &default {
                Some(d) => Some(self.expand(d, sp, &lookup)?),
                None => None,
            };
            let global = self.globals.iter().rev().find(|g| g.name == name);
            let value = self
                .opts
                .build_args
                .get(&name)
                .cloned()
                .or(default_val.clone())
                .or_else(|| global.and_then(|g| g.value.clone()))
                .or_else(|| self.builtins.get(&name).cloned());
            let is_builtin = self.builtins.contains_key(&name);
            if !is_builtin {
                let (default_shown, description) = match (&default, global) {
                    (Some(d), _) => (Some(d.clone()), description_of(inst)),
                    (None, Some(g)) => (
                        g.default.clone(),
                        if description_of(inst).is_empty() {
                            g.description.clone()
                        } else {
                            description_of(inst)
                        },
                    ),
                    (None, None) => (None, description_of(inst)),
                };
                self.note_arg(ArgInfo {
                    name: name.clone(),
                    default: default_shown,
                    value: value.clone(),
                    description,
                    // A re-declared global ARG is listed where its default lives.
                    line: match (&default, global) {
                        (None, Some(g)) => g.line,
                        _ => inst.span.start.line,
                    },
                });
            }
            shown.push(match &default {
                Some(d) => format!("{name}={d}"),
                None => name.clone(),
            });
            // Each ARG of a line is visible to the next one, as in BuildKit.
            if let Some(v) = &value {
                st.env.env_set(&name, v);
            }
            st.args.push((name, value));
        }
        let _ = span;
        Self::history(st, format!("ARG {}", shown.join(" ")), true);
        Ok(())
    }

    fn lower_healthcheck(
        &mut self,
        st: &mut StageState,
        inst: &Instruction,
        span: Span,
    ) -> Result<(), FrontendError> {
        let Args::Healthcheck { kind, command } = &inst.args else {
            return Err(FrontendError::new("HEALTHCHECK requires an argument", span));
        };
        let mut hc = Healthcheck::default();
        match kind.text.to_ascii_uppercase().as_str() {
            "NONE" => {
                if !matches!(**command, Args::Empty) {
                    return Err(FrontendError::new(
                        "HEALTHCHECK NONE takes no arguments",
                        span,
                    ));
                }
                hc.test = vec!["NONE".into()];
            }
            "CMD" => {
                hc.test = match &**command {
                    Args::Json(j) => std::iter::once("CMD".to_string())
                        .chain(j.values.iter().cloned())
                        .collect(),
                    Args::Text(w) => vec!["CMD-SHELL".into(), w.text.clone()],
                    _ => {
                        return Err(FrontendError::new(
                            "HEALTHCHECK CMD requires a command",
                            span,
                        ))
                    }
                };
                for f in &inst.flags {
                    let v = f.value.clone().unwrap_or_default();
                    if f.name == "retries" {
                        hc.retries = v.parse().map_err(|_| {
                            FrontendError::new(
                                format!("--retries: {v:?} is not a whole number"),
                                f.span,
                            )
                        })?;
                    } else {
                        let d = parse_duration(&v).ok_or_else(|| {
                            FrontendError::new(
                                format!("--{}: {v:?} is not a duration like 30s or 1m30s", f.name),
                                f.span,
                            )
                        })?;
                        match f.name.as_str() {
                            "interval" => hc.interval = d,
                            "timeout" => hc.timeout = d,
                            "start-period" => hc.start_period = d,
                            _ => hc.start_interval = d,
                        }
                    }
                }
            }
            other => {
                return Err(FrontendError::new(
                    format!("unknown type {other:?} in HEALTHCHECK (try CMD)"),
                    kind.span,
                ))
            }
        }
        Self::history(st, format!("HEALTHCHECK {:?}", hc.test), true);
        st.config.healthcheck = Some(hc);
        Ok(())
    }

    fn lower_run(
        &mut self,
        st: &mut StageState,
        inst: &Instruction,
        at: Option<Span>,
    ) -> Result<(), FrontendError> {
        // `--network`/`--opt force-network-mode` sets the mode of steps that name none.
        let mut network = self.opts.network;
        let mut security = SecurityMode::Sandbox;
        let mut mounts = Vec::new();
        let mut inputs: Vec<VertexId> = Vec::new();
        let (rootfs, root_inputs) = input_of(st.root);
        inputs.extend(root_inputs);
        for f in &inst.flags {
            // BuildKit expands the values inside `--mount` (field by field) but reads
            // `--network` and `--security` as written.
            let v = f.value.as_deref().unwrap_or("");
            let as_written = if v.contains('$') {
                " (variables are not expanded in this flag)"
            } else {
                ""
            };
            match f.name.as_str() {
                "network" => {
                    network = match v {
                        "default" => NetworkMode::Default,
                        "none" => NetworkMode::None,
                        "host" if !self.opts.entitlements.network_host => {
                            return Err(FrontendError::new(
                                "RUN --network=host needs the network.host entitlement: the \
                                 host's network exposes every service on the runner's loopback \
                                 to this step; build with --allow network.host",
                                f.span,
                            ))
                        }
                        "host" => NetworkMode::Host,
                        _ => {
                            return Err(FrontendError::new(
                                format!(
                                    "unsupported network mode {v:?}: expected default, none \
                                     or host{as_written}"
                                ),
                                f.span,
                            ))
                        }
                    }
                }
                "security" => {
                    security = match v {
                        "sandbox" => SecurityMode::Sandbox,
                        "insecure" => SecurityMode::Insecure,
                        _ => {
                            return Err(FrontendError::new(
                                format!(
                                    "unsupported security mode {v:?}: expected sandbox or \
                                     insecure{as_written}"
                                ),
                                f.span,
                            ))
                        }
                    }
                }
                _ => {
                    let m = self.parse_mount(st, v, f, &mut inputs)?;
                    mounts.push(m);
                }
            }
        }
        let (args, shell_form) = match &inst.args {
            Args::Json(j) if j.values.is_empty() => {
                return Err(FrontendError::new(
                    "RUN [] has no command: the exec form needs at least the program to run",
                    inst.span,
                ))
            }
            Args::Json(j) => (j.values.clone(), false),
            Args::Text(w) => {
                let cmd = run_script(&w.text, inst);
                let mut a = st.shell();
                a.push(cmd);
                (a, true)
            }
            // A bare `RUN` (or one with only flags) runs an empty script with the stage's
            // shell, as BuildKit's parser and lowering make it.
            _ => {
                let mut a = st.shell();
                a.push(String::new());
                (a, true)
            }
        };
        let proxies: Vec<(String, String)> = PROXY_ARGS
            .iter()
            .filter_map(|p| {
                self.opts
                    .build_args
                    .get(*p)
                    .map(|v| (p.to_string(), v.clone()))
            })
            .collect();
        let env = st.run_env(&proxies);
        // Every RUN holds its own copy of the environment: count it, so that many steps
        // under one huge ARG cannot add up to gigabytes either.
        self.count_expanded(env.iter().map(String::len).sum(), inst.span)?;
        let cwd = if st.config.working_dir.is_empty() {
            "/".to_string()
        } else {
            st.config.working_dir.clone()
        };
        let meta = self.step_meta(st, inst, at);
        let op = ExecOp {
            rootfs,
            args: args.clone(),
            env,
            cwd,
            user: st.config.user.clone(),
            network,
            security,
            mounts,
        };
        st.root = Some(self.push(Op::Exec(op), inputs, meta));
        let arg_list: Vec<String> = st
            .args
            .iter()
            .filter(|(k, _)| !PROXY_ARGS.contains(&k.as_str()))
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
            .collect();
        let prefix = if arg_list.is_empty() {
            String::new()
        } else {
            format!("|{} {} ", arg_list.len(), arg_list.join(" "))
        };
        let shown = if shell_form {
            args.join(" ")
        } else {
            format!("{args:?}")
        };
        Self::history(st, format!("RUN {prefix}{shown} # buildkit"), false);
        Ok(())
    }

    /// Lowers one `RUN --mount` value as written, read by the parser crate's
    /// [`kiln_dockerfile::instructions::parse_mount_expanding`] (each field's value expanded
    /// on its own), with BuildKit's defaults per type.
    fn parse_mount(
        &mut self,
        st: &StageState,
        v: &str,
        f: &Flag,
        inputs: &mut Vec<VertexId>,
    ) -> Result<Mount, FrontendError> {
        use kiln_dockerfile::instructions::{self as ins, MountType};
        let err = |m: String| FrontendError::new(format!("--mount={v}: {m}"), f.span);
        let mut expand_failure = None;
        let parsed = {
            let lookup = |n: &str| st.lookup(n);
            ins::parse_mount_expanding(v, &mut |word| match self.expand(word, f.span, &lookup) {
                Ok(x) => Ok(Some(x)),
                Err(e) => {
                    let msg = e.message.clone();
                    expand_failure = Some(e);
                    Err(msg)
                }
            })
        };
        let mut m = match (parsed, expand_failure) {
            // An expansion error (e.g. a value past the size limit) is reported as it is.
            (_, Some(e)) => return Err(e),
            (Ok(m), None) => m,
            (Err(e), None) if e.starts_with("unsupported mount type") => {
                return Err(err(format!(
                    "{e}: expected bind, cache, tmpfs, secret or ssh"
                )))
            }
            (Err(e), None) => return Err(err(e)),
        };
        // `from=` that expands to nothing means the build context, as in BuildKit.
        if m.from.as_deref() == Some("") {
            m.from = None;
        }
        let mut from_input =
            |s: &mut Self, from: Option<&str>| -> Result<Option<InputIndex>, FrontendError> {
                let Some(from) = from else { return Ok(None) };
                match s.stage_or_image_source(st, from, f.span)? {
                    Some(id) => {
                        inputs.push(id);
                        Ok(Some((inputs.len() - 1) as InputIndex))
                    }
                    None => Ok(None),
                }
            };
        let abs = |t: &str| resolve_path(&st.config.working_dir, t);
        // Bind, cache and tmpfs mounts without `target=` go to the WORKDIR and a relative
        // target is joined to it (BuildKit's rule); only a mount over `/` itself is refused.
        // Secret and SSH mounts keep their own default paths.
        if matches!(
            m.kind,
            MountType::Bind | MountType::Cache | MountType::Tmpfs
        ) {
            let resolved = abs(m.target.as_deref().unwrap_or(""));
            if resolved.trim_end_matches('/').is_empty() {
                let workdir = match st.config.working_dir.as_str() {
                    "" => "/",
                    w => w,
                };
                let why = match m.target.as_deref() {
                    None | Some("") => {
                        format!("without target= the mount goes to the WORKDIR, which is {workdir}")
                    }
                    Some(t) => format!("target={t} resolves to / (WORKDIR {workdir})"),
                };
                return Err(err(format!(
                    "invalid mount target \"/\": {why}; a mount cannot cover the root \
                     filesystem, so give target= a directory"
                )));
            }
            m.target = Some(resolved);
        }
        let target = m.target.as_deref().map(abs);
        let source = m.source.clone().unwrap_or_default();
        let (uid, gid) = (m.uid.unwrap_or(0), m.gid.unwrap_or(0));
        let (target, kind) = match m.kind {
            MountType::Bind => {
                let input = match m.from.as_deref() {
                    Some(fr) => from_input(self, Some(fr))?,
                    None => {
                        let c = self.context();
                        inputs.push(c);
                        Some((inputs.len() - 1) as InputIndex)
                    }
                };
                let kind = match input {
                    Some(input) => MountKind::Bind {
                        input,
                        source,
                        readonly: m.read_only,
                    },
                    // `from=scratch`: an empty directory.
                    None => MountKind::Tmpfs { size: 0 },
                };
                (target.unwrap_or_default(), kind)
            }
            MountType::Cache => {
                let target = target.unwrap_or_default();
                let kind = MountKind::Cache {
                    id: m
                        .id
                        .clone()
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| target.clone()),
                    sharing: match m.sharing {
                        None | Some(ins::Sharing::Shared) => CacheSharing::Shared,
                        Some(ins::Sharing::Private) => CacheSharing::Private,
                        Some(ins::Sharing::Locked) => CacheSharing::Locked,
                    },
                    input: from_input(self, m.from.as_deref())?,
                    source,
                    readonly: m.read_only,
                    uid,
                    gid,
                    mode: m.mode.unwrap_or(0o755),
                };
                (target, kind)
            }
            MountType::Tmpfs => (
                target.unwrap_or_default(),
                MountKind::Tmpfs {
                    size: m.size.unwrap_or(0),
                },
            ),
            MountType::Secret => {
                let id = m.id.clone().filter(|s| !s.is_empty()).or_else(|| {
                    m.target
                        .as_deref()
                        .map(|t| t.rsplit('/').next().unwrap_or(t).to_string())
                });
                let id = id.ok_or_else(|| err("a secret mount needs id= or target=".into()))?;
                if !self.secrets.iter().any(|s| s.id == id) {
                    self.secrets.push(SecretInfo {
                        id: id.clone(),
                        required: m.required,
                        line: f.span.start.line,
                    });
                }
                let target = match (target, &m.env) {
                    (Some(t), _) => t,
                    (None, Some(_)) => String::new(),
                    (None, None) => format!("/run/secrets/{id}"),
                };
                let kind = MountKind::Secret {
                    id,
                    env: m.env.clone(),
                    required: m.required,
                    uid,
                    gid,
                    mode: m.mode.unwrap_or(0o400),
                };
                (target, kind)
            }
            MountType::Ssh => {
                let id =
                    m.id.clone()
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| "default".into());
                if !self.ssh.iter().any(|s| s.id == id) {
                    self.ssh.push(SecretInfo {
                        id: id.clone(),
                        required: m.required,
                        line: f.span.start.line,
                    });
                }
                let target = target.unwrap_or_else(|| "/run/buildkit/ssh_agent.0".into());
                let kind = MountKind::Ssh {
                    id,
                    required: m.required,
                    uid,
                    gid,
                    mode: m.mode.unwrap_or(0o600),
                };
                (target, kind)
            }
        };
        Ok(Mount { target, kind })
    }

    fn lower_copy(
        &mut self,
        st: &mut StageState,
        inst: &Instruction,
        at: Option<Span>,
        is_add: bool,
    ) -> Result<(), FrontendError> {
        let name = inst.name();
        let lookup = |n: &str| st.lookup(n);
        let flag = |n: &str| inst.flags.iter().find(|f| f.name == n);
        let flag_val = |s: &Self, n: &str| -> Result<Option<String>, FrontendError> {
            match flag(n) {
                Some(f) => Ok(Some(s.expand(
                    f.value.as_deref().unwrap_or(""),
                    f.span,
                    &lookup,
                )?)),
                None => Ok(None),
            }
        };
        let bool_flag = |n: &str| -> Result<bool, FrontendError> {
            match flag(n) {
                None => Ok(false),
                Some(f) => match f.value.as_deref() {
                    None | Some("true") | Some("") => Ok(true),
                    Some("false") => Ok(false),
                    Some(x) => Err(FrontendError::new(
                        format!(
                            "--{}={x}: expected true or false{}",
                            f.name,
                            if x.contains('$') {
                                " (variables are not expanded in this flag)"
                            } else {
                                ""
                            }
                        ),
                        f.span,
                    )),
                },
            }
        };
        let raw: Vec<String> = match &inst.args {
            Args::Json(j) => j
                .values
                .iter()
                .map(|v| self.expand(v, inst.span, &lookup))
                .collect::<Result<_, _>>()?,
            // The parser has already split the arguments on whitespace; BuildKit expands each
            // one as a single word, so one that expands to nothing stays an (empty) argument
            // and one that expands to `a b` stays one path.
            Args::Words(ws) => {
                let mut out = Vec::new();
                for w in ws {
                    if w.text.starts_with("<<") {
                        out.push(w.text.clone());
                    } else {
                        out.push(self.expand(&w.text, w.span, &lookup)?);
                    }
                }
                out
            }
            _ => Vec::new(),
        };
        if raw.len() < 2 {
            return Err(FrontendError::new(format!("{name} requires at least two arguments, but only one was provided. Destination could not be determined"), inst.span));
        }
        let (dest_raw, srcs) = raw
            .split_last()
            .map(|(d, s)| (d.clone(), s.to_vec()))
            .unwrap_or_default();
        let dest = resolve_path(&st.config.working_dir, &dest_raw);
        // An empty destination (`COPY a $UNSET`) is the WORKDIR, a directory. Several
        // sources do not make one: BuildKit copies each onto a path without `/`.
        let dest_is_dir = dest_raw.ends_with('/')
            || dest_raw.ends_with("/.")
            || dest_raw == "."
            || dest_raw.is_empty();
        let chown = flag_val(self, "chown")?
            .filter(|s| !s.is_empty())
            .map(|s| parse_chown(&s));
        let chmod = flag_val(self, "chmod")?.filter(|s| !s.is_empty());
        if let Some(m) = &chmod {
            let octal = m.len() <= 4 && m.chars().all(|c| ('0'..='7').contains(&c));
            let symbolic = m.chars().all(|c| "ugoa+-=rwxXst,".contains(c));
            if !octal && !symbolic {
                let f = flag("chmod").map(|f| f.span).unwrap_or(inst.span);
                return Err(FrontendError::new(
                    format!(
                        "invalid chmod value {m:?}: expected octal like 0755 or symbolic like u+x"
                    ),
                    f,
                ));
            }
        }
        let link = bool_flag("link")?;
        let parents = bool_flag("parents")?;
        let keep_git_dir = bool_flag("keep-git-dir")?;
        let checksum = flag_val(self, "checksum")?;
        // BuildKit takes `--exclude` patterns as written (it does not expand them; see
        // moby/buildkit#6072), so `$` in a pattern is a literal character.
        let exclude: Vec<String> = inst
            .flags
            .iter()
            .filter(|f| f.name == "exclude")
            .map(|f| f.value.clone().unwrap_or_default())
            .collect();
        let from = match flag("from") {
            Some(f) => {
                let raw = f.value.as_deref().unwrap_or("");
                if kiln_dockerfile::instructions::from_has_variable(raw) {
                    return Err(FrontendError::new(
                        kiln_dockerfile::instructions::COPY_FROM_VARIABLE,
                        f.span,
                    ));
                }
                Some((self.expand(raw, f.span, &lookup)?, f.span))
            }
            None => None,
        };

        // Heredoc sources become inline files; URL sources (ADD) become downloads.
        let mut heredocs = inst.heredocs.iter();
        let mut inline = Vec::new();
        let mut urls = Vec::new();
        let mut paths = Vec::new();
        for s in &srcs {
            if s.starts_with("<<") {
                if let Some(h) = heredocs.next() {
                    let body = h.body();
                    let content = if h.expand {
                        let mut lx = self.lexer;
                        lx.skip_process_quotes = true;
                        lx.raw_escapes = true;
                        lx.process_word(&body, &lookup)
                            .map_err(|e| FrontendError::new(e.to_string(), h.span))?
                    } else {
                        body
                    };
                    inline.push(InlineFile {
                        name: h.name.clone(),
                        content,
                    });
                    continue;
                }
            }
            if s.starts_with("http://") || s.starts_with("https://") || s.starts_with("git@") {
                if !is_add {
                    return Err(FrontendError::new(
                        format!("source can't be a URL for COPY: {s}"),
                        inst.span,
                    ));
                }
                urls.push(s.clone());
                continue;
            }
            paths.push(s.clone());
        }
        if checksum.is_some() && urls.is_empty() {
            return Err(FrontendError::new(
                "checksum can't be specified for non-HTTP(S) sources",
                inst.span,
            ));
        }
        let meta = self.step_meta(st, inst, at);
        let base = st.root;
        let mut current = base;
        let make_copy = |s: &mut Self,
                         current: Option<VertexId>,
                         source_vertex: Option<VertexId>,
                         source: Option<CopySource>,
                         srcs: Vec<String>,
                         auto_extract: bool|
         -> VertexId {
            // `--link` makes its layer on an empty filesystem, keyed without the stage below
            // it, then stacks it on the stage: a changed base reuses the layer as it is.
            // Owner names must be looked up in the stage's /etc/passwd, so a copy that
            // names them keeps the stage as its base.
            let numeric = |v: &str| v.parse::<u32>().is_ok();
            let rebase = link
                && current.is_some()
                && chown
                    .as_ref()
                    .is_none_or(|c| numeric(&c.user) && c.group.as_deref().is_none_or(numeric));
            let below = current;
            let current = if rebase { None } else { current };
            let mut inputs = Vec::new();
            let dest_base = current.map(|c| {
                inputs.push(c);
                0
            });
            let source = match (source, source_vertex) {
                (Some(s), _) => s,
                (None, Some(v)) => {
                    inputs.push(v);
                    CopySource::Input {
                        input: (inputs.len() - 1) as InputIndex,
                    }
                }
                (None, None) => CopySource::Inline { files: vec![] },
            };
            let copied = s.push(
                Op::Copy(CopyOp {
                    dest_base,
                    source,
                    srcs,
                    dest: dest.clone(),
                    dest_is_dir,
                    chown: chown.clone(),
                    chmod: chmod.clone(),
                    link,
                    parents,
                    exclude: exclude.clone(),
                    auto_extract,
                    keep_git_dir,
                    is_add,
                }),
                inputs,
                meta.clone(),
            );
            match below {
                Some(base) if rebase => s.push(
                    Op::Merge(MergeOp::default()),
                    vec![base, copied],
                    VertexMeta {
                        description: format!("{} (link onto the stage)", meta.description),
                        ..meta.clone()
                    },
                ),
                _ => copied,
            }
        };
        if !paths.is_empty() {
            let src_vertex = match &from {
                Some((fr, sp)) => self.stage_or_image_source(st, fr, *sp)?,
                None => Some(self.context()),
            };
            let auto_extract = is_add && from.is_none();
            current = Some(make_copy(
                self,
                current,
                src_vertex,
                None,
                paths.clone(),
                auto_extract,
            ));
        }
        if !inline.is_empty() {
            let names = inline.iter().map(|f| f.name.clone()).collect();
            current = Some(make_copy(
                self,
                current,
                None,
                Some(CopySource::Inline { files: inline }),
                names,
                false,
            ));
        }
        for u in &urls {
            let filename = url_file_name(u);
            let http = self.push(
                Op::Http(HttpSource {
                    url: u.clone(),
                    checksum: checksum.clone(),
                    filename: filename.clone(),
                }),
                vec![],
                VertexMeta {
                    description: format!("[internal] download {u}"),
                    stage: None,
                    span: Some(source_span(inst.span)),
                    ignore_cache: st.ignore_cache,
                },
            );
            current = Some(make_copy(
                self,
                current,
                Some(http),
                None,
                vec![filename],
                false,
            ));
        }
        st.root = current;
        let shown = raw.join(" ");
        let flags_shown: Vec<String> = inst
            .flags
            .iter()
            .filter(|f| {
                f.name == "from" || f.name == "chown" || f.name == "chmod" || f.name == "link"
            })
            .map(|f| f.text())
            .collect();
        let mut created = name.clone();
        for f in flags_shown {
            created.push(' ');
            created.push_str(&f);
        }
        Self::history(st, format!("{created} {shown} # buildkit"), false);
        Ok(())
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

/// `ARG a b=1 "c=x y"` → declarations (name, default) as written.
fn arg_decls(inst: &Instruction) -> Result<Vec<(String, Option<String>, Span)>, FrontendError> {
    let words: Vec<(String, Span)> = match &inst.args {
        Args::Words(w) => w.iter().map(|w| (w.text.clone(), w.span)).collect(),
        Args::Text(w) => vec![(w.text.clone(), w.span)],
        Args::KeyValues(kv) => kv
            .iter()
            .map(|p| (format!("{}={}", p.key.text, p.value.text), p.key.span))
            .collect(),
        _ => Vec::new(),
    };
    if words.is_empty() {
        return Err(FrontendError::new(
            "ARG requires at least one argument",
            inst.span,
        ));
    }
    Ok(words
        .into_iter()
        .map(|(w, sp)| match w.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string()), sp),
            None => (w, None, sp),
        })
        .collect())
}

fn key_values(inst: &Instruction) -> Result<Vec<(String, String, Span)>, FrontendError> {
    match &inst.args {
        Args::KeyValues(kv) if !kv.is_empty() => Ok(kv
            .iter()
            .map(|p| (p.key.text.clone(), p.value.text.clone(), p.key.span))
            .collect()),
        _ => Err(FrontendError::new(
            format!("{} requires at least one argument", inst.name()),
            inst.span,
        )),
    }
}

fn text_arg(inst: &Instruction) -> Option<String> {
    match &inst.args {
        Args::Text(w) => Some(w.text.clone()),
        Args::Words(w) if !w.is_empty() => Some(
            w.iter()
                .map(|w| w.text.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        ),
        Args::Json(j) if j.values.len() == 1 => Some(j.values[0].clone()),
        _ => None,
    }
}

fn words_of(inst: &Instruction) -> Vec<String> {
    match &inst.args {
        Args::Words(w) => w.iter().map(|w| w.text.clone()).collect(),
        Args::Text(w) => vec![w.text.clone()],
        Args::Json(j) => j.values.clone(),
        _ => Vec::new(),
    }
}

/// CMD/ENTRYPOINT args and whether the stage's SHELL must be prepended (shell form).
fn command_args(inst: &Instruction) -> (Vec<String>, bool) {
    match &inst.args {
        Args::Json(j) => (j.values.clone(), false),
        Args::Text(w) => (vec![w.text.clone()], true),
        _ => (Vec::new(), false),
    }
}

/// The script a shell-form RUN hands to the shell: a lone heredoc runs as the script itself;
/// otherwise heredoc bodies follow the command line as the shell expects them.
fn run_script(cmd: &str, inst: &Instruction) -> String {
    if inst.heredocs.is_empty() {
        return cmd.to_string();
    }
    let t = cmd.trim();
    if inst.heredocs.len() == 1 && t.starts_with("<<") && !t.contains(char::is_whitespace) {
        return inst.heredocs[0].body();
    }
    let mut s = cmd.to_string();
    for h in &inst.heredocs {
        s.push('\n');
        s.push_str(&h.content);
        s.push_str(&h.name);
    }
    s
}

fn parse_chown(s: &str) -> Chown {
    match s.split_once(':') {
        Some((u, g)) => Chown {
            user: u.to_string(),
            group: Some(g.to_string()),
        },
        None => Chown {
            user: s.to_string(),
            group: None,
        },
    }
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

fn expose_ports(p: &str) -> Result<Vec<String>, String> {
    let (port, proto) = match p.split_once('/') {
        Some((a, b)) => (a, b.to_ascii_lowercase()),
        None => (p, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid proto: {proto}"));
    }
    let parse = |x: &str| {
        x.parse::<u16>()
            .map_err(|_| format!("invalid containerPort: {x}"))
    };
    let (lo, hi) = match port.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => (parse(port)?, parse(port)?),
    };
    if hi < lo {
        return Err(format!("invalid port range: {port}"));
    }
    Ok((lo..=hi).map(|n| format!("{n}/{proto}")).collect())
}

/// Go duration (`1m30s`, `500ms`, `2h`) in nanoseconds.
fn parse_duration(s: &str) -> Option<u64> {
    if s == "0" {
        return Some(0);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let num: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..u] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += num * mult;
        rest = &rest[u..];
    }
    Some(total as u64)
}

/// The file name `ADD <url>` saves as: the last segment of the URL's path, percent-decoded
/// (trailing slashes ignored), or `__unnamed__` when the path has none, as BuildKit names it.
fn url_file_name(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .split_once('/')
        .map_or("", |(_, p)| p);
    let last = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
    let name = percent_encoding::percent_decode_str(last).decode_utf8_lossy();
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        "__unnamed__".to_owned()
    } else {
        name.into_owned()
    }
}

/// Checks what BuildKit checks when it parses an instruction, before anything is built: a
/// known keyword, flags it accepts (each once, but `--mount`/`--exclude`), and COPY/ADD
/// with a destination. BuildKit does this for every stage, so an error in a stage the
/// target does not need still fails the build.
fn check_instruction_shape(inst: &Instruction) -> Result<Keyword, FrontendError> {
    let kind = inst.kind().ok_or_else(|| {
        FrontendError::new(Keyword::unknown_message(&inst.keyword), keyword_span(inst))
    })?;
    let allowed: &[&str] = match kind {
        Keyword::Run => &["mount", "network", "security"],
        Keyword::Copy => &["from", "chown", "chmod", "link", "parents", "exclude"],
        Keyword::Add => &[
            "chown",
            "chmod",
            "link",
            "keep-git-dir",
            "checksum",
            "exclude",
            "unpack",
        ],
        Keyword::Healthcheck => &[
            "interval",
            "timeout",
            "start-period",
            "start-interval",
            "retries",
        ],
        _ => &[],
    };
    for f in &inst.flags {
        if !allowed.contains(&f.name.as_str()) {
            return Err(FrontendError::new(
                format!("unknown flag: --{} for {}", f.name, inst.name()),
                f.span,
            ));
        }
        let repeatable = matches!(f.name.as_str(), "mount" | "exclude");
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
