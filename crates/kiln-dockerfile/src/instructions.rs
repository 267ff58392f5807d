//! Typed instructions, like BuildKit's `instructions` package: each raw [`Instruction`] becomes
//! a [`Command`] with its flags parsed and values validated. Values are NOT expanded here
//! (the frontend expands them with its ARG/ENV scope); values that still contain `$` are
//! validated after expansion by the frontend (see [`parse_mount`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ast::{Args, Dockerfile, Flag, Heredoc, Instruction, Keyword, Span, Word};
use crate::error::{ErrorKind, ParseError};

/// A validated instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypedInstruction {
    /// What it does.
    pub command: Command,
    /// The keyword as written.
    pub keyword: String,
    /// Where it is.
    pub span: Span,
}

/// The instructions with their parsed arguments (raw, unexpanded text).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Command {
    From(From),
    Run(Run),
    Cmd(CommandLine),
    Entrypoint(CommandLine),
    Label(Vec<Pair>),
    Expose(Vec<Word>),
    Env(Vec<Pair>),
    Add(AddCopy),
    Copy(AddCopy),
    Volume(Vec<Word>),
    User(Word),
    Workdir(Word),
    Arg(Vec<ArgDecl>),
    /// The trigger instruction text, stored as BuildKit stores it (re-parsed when used).
    Onbuild(String),
    Stopsignal(Word),
    Healthcheck(Healthcheck),
    Shell(Vec<String>),
    Maintainer(Word),
}

/// `FROM [--platform=p] image [AS name]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct From {
    /// `--platform` value as written.
    pub platform: Option<String>,
    /// Image reference or stage name as written.
    pub image: Word,
    /// Stage name after `AS`, as written.
    pub name: Option<Word>,
}

/// A command in shell or exec form (heredoc bodies are in [`Run::heredocs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    /// Shell form: run with the stage's SHELL.
    Shell(String),
    /// Exec (JSON) form.
    Exec(Vec<String>),
}

/// `RUN` with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// The command.
    pub command: CommandLine,
    /// `--mount` options in order.
    pub mounts: Vec<Mount>,
    /// `--network`.
    pub network: Option<NetworkMode>,
    /// `--security`.
    pub security: Option<SecurityMode>,
    /// Heredoc bodies of the line.
    pub heredocs: Vec<Heredoc>,
}

/// `RUN --network=`: the one definition of a step's network mode. The parser reads it, the
/// build graph stores it in its RUN op (its serde spelling is part of every RUN's cache key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkMode {
    /// The worker default (host).
    Default,
    /// No network.
    None,
    /// The host's network.
    Host,
}

impl NetworkMode {
    /// The mode a `--network` value names, exactly as written (`default`, `none`, `host`).
    pub fn from_flag_value(value: &str) -> Option<Self> {
        match value {
            "default" => Some(NetworkMode::Default),
            "none" => Some(NetworkMode::None),
            "host" => Some(NetworkMode::Host),
            _ => None,
        }
    }
}

/// `RUN --security=`: the one definition of a step's security mode (its serde spelling is
/// part of every RUN's cache key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecurityMode {
    /// Default capabilities.
    Sandbox,
    /// All capabilities.
    Insecure,
}

impl SecurityMode {
    /// The mode a `--security` value names, exactly as written (`sandbox`, `insecure`).
    pub fn from_flag_value(value: &str) -> Option<Self> {
        match value {
            "sandbox" => Some(SecurityMode::Sandbox),
            "insecure" => Some(SecurityMode::Insecure),
            _ => None,
        }
    }
}

/// `--mount` type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum MountType {
    Bind,
    Cache,
    Tmpfs,
    Secret,
    Ssh,
}

/// `sharing=` of a cache mount: the one definition (its serde spelling is part of the cache
/// key of every RUN with a cache mount).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheSharing {
    /// Concurrent writers share one directory.
    Shared,
    /// Concurrent writers get separate copies.
    Private,
    /// Writers wait for each other.
    Locked,
}

impl CacheSharing {
    /// The mode a `sharing=` value names, in any case (`shared`, `private`, `locked`).
    pub fn from_flag_value(value: &str) -> Option<Self> {
        match value.to_ascii_lowercase().as_str() {
            "shared" => Some(CacheSharing::Shared),
            "private" => Some(CacheSharing::Private),
            "locked" => Some(CacheSharing::Locked),
            _ => None,
        }
    }
}

/// One `RUN --mount=...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Mount type (default bind).
    pub kind: MountType,
    /// `target`/`dst`/`destination`.
    pub target: Option<String>,
    /// `source`/`src`.
    pub source: Option<String>,
    /// `from`: stage, image or named context.
    pub from: Option<String>,
    /// Read-only (`ro`/`readonly`; bind defaults to read-only, `rw` turns it off).
    pub read_only: bool,
    /// `id` (cache, secret, ssh).
    pub id: Option<String>,
    /// `sharing` (cache).
    pub sharing: Option<CacheSharing>,
    /// `mode` (octal file mode).
    pub mode: Option<u32>,
    /// `uid`.
    pub uid: Option<u32>,
    /// `gid`.
    pub gid: Option<u32>,
    /// `size` in bytes (tmpfs).
    pub size: Option<u64>,
    /// `required` (secret, ssh).
    pub required: bool,
    /// `env`: expose the secret as this environment variable.
    pub env: Option<String>,
    /// Where the flag is written.
    pub span: Span,
}

/// `ADD` / `COPY` with their options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddCopy {
    /// Sources (the last argument is the destination and is not here).
    pub sources: Vec<String>,
    /// Destination.
    pub dest: String,
    /// Heredoc sources (`COPY <<EOF /dst`).
    pub heredocs: Vec<Heredoc>,
    /// `--from` (COPY only).
    pub from: Option<String>,
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// `--parents` (COPY).
    pub parents: bool,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
    /// `--keep-git-dir` (ADD).
    pub keep_git_dir: bool,
    /// `--checksum` (ADD).
    pub checksum: Option<String>,
    /// True when the arguments were in JSON form.
    pub json: bool,
}

/// `KEY=value` of ENV/LABEL (raw text; expand with `ProcessWord`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// Key as written.
    pub key: Word,
    /// Value as written.
    pub value: Word,
}

/// One `ARG name[=default]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    /// Name as written.
    pub name: String,
    /// Default value as written (None without `=`).
    pub default: Option<String>,
    /// Where the declaration is.
    pub span: Span,
}

/// `HEALTHCHECK NONE` or `HEALTHCHECK [opts] CMD ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Healthcheck {
    /// Disable any inherited health check.
    None,
    /// Run a check command.
    Cmd {
        /// The test command.
        command: CommandLine,
        /// `--interval`.
        interval: Option<Duration>,
        /// `--timeout`.
        timeout: Option<Duration>,
        /// `--start-period`.
        start_period: Option<Duration>,
        /// `--start-interval`.
        start_interval: Option<Duration>,
        /// `--retries`.
        retries: Option<i64>,
    },
}

/// Lowers every instruction of a parsed Dockerfile; stops at the first error.
pub fn lower_all(df: &Dockerfile) -> Result<Vec<TypedInstruction>, ParseError> {
    df.instructions.iter().map(lower).collect()
}

/// How a flag takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagKind {
    /// `--name=value`, at most once.
    Str,
    /// `--name` or `--name=true|false`, at most once.
    Bool,
    /// `--name=value`, any number of times (`--mount`, `--exclude`).
    List,
}

/// How a flag's value meets the stage's ARG/ENV scope, as BuildKit decides it per flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagExpansion {
    /// The whole value is expanded (`--chown`, `--chmod`, `--checksum`, `FROM --platform`).
    Expanded,
    /// The value is split into `key=value` fields first and each value is expanded on its
    /// own (`--mount`; see [`parse_mount_expanding`]).
    PerField,
    /// A value holding a variable is refused (the stage graph is known before any variable
    /// has a value, see [`from_has_variable`]); what remains is expanded (`COPY --from`).
    NoVariables,
    /// Read as written: a `$` is a literal character (`--network`, `--security`, booleans,
    /// `--exclude`, HEALTHCHECK durations).
    AsWritten,
}

/// One flag an instruction accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlagSpec {
    /// Name without the leading `--`.
    pub name: &'static str,
    /// How it takes its value.
    pub kind: FlagKind,
    /// Whether and how its value is expanded.
    pub expansion: FlagExpansion,
}

const fn flag(name: &'static str, kind: FlagKind, expansion: FlagExpansion) -> FlagSpec {
    FlagSpec {
        name,
        kind,
        expansion,
    }
}

/// The flags each instruction accepts: kiln's one allow-list. The parser's [`lower`] and
/// the frontend's lowering both check flags against it, and the frontend expands each value
/// as its [`FlagExpansion`] says.
pub fn accepted_flags(kind: Keyword) -> &'static [FlagSpec] {
    use FlagExpansion::*;
    use FlagKind::*;
    const FROM: &[FlagSpec] = &[flag("platform", Str, Expanded)];
    const RUN: &[FlagSpec] = &[
        flag("mount", List, PerField),
        flag("network", Str, AsWritten),
        flag("security", Str, AsWritten),
    ];
    const COPY: &[FlagSpec] = &[
        flag("from", Str, NoVariables),
        flag("chown", Str, Expanded),
        flag("chmod", Str, Expanded),
        flag("link", Bool, AsWritten),
        flag("parents", Bool, AsWritten),
        flag("exclude", List, AsWritten),
    ];
    const ADD: &[FlagSpec] = &[
        flag("chown", Str, Expanded),
        flag("chmod", Str, Expanded),
        flag("link", Bool, AsWritten),
        flag("keep-git-dir", Bool, AsWritten),
        flag("checksum", Str, Expanded),
        flag("exclude", List, AsWritten),
        // Accepted and checked as a boolean; archives are extracted as without it.
        flag("unpack", Bool, AsWritten),
    ];
    const HEALTHCHECK: &[FlagSpec] = &[
        flag("interval", Str, AsWritten),
        flag("timeout", Str, AsWritten),
        flag("start-period", Str, AsWritten),
        flag("start-interval", Str, AsWritten),
        flag("retries", Str, AsWritten),
    ];
    match kind {
        Keyword::From => FROM,
        Keyword::Run => RUN,
        Keyword::Copy => COPY,
        Keyword::Add => ADD,
        Keyword::Healthcheck => HEALTHCHECK,
        _ => &[],
    }
}

/// The spec of flag `name` of instruction `kind`, or `None` when `kind` does not accept it.
pub fn flag_spec(kind: Keyword, name: &str) -> Option<&'static FlagSpec> {
    accepted_flags(kind).iter().find(|f| f.name == name)
}

/// Parsed flags of one instruction (BuildKit's `BFlags`).
struct Flags<'a> {
    given: Vec<(&'a Flag, FlagKind)>,
}

impl<'a> Flags<'a> {
    fn parse(inst: &'a Instruction, keyword: Keyword) -> Result<Self, ParseError> {
        let mut given: Vec<(&Flag, FlagKind)> = Vec::new();
        for f in &inst.flags {
            let Some(kind) = flag_spec(keyword, &f.name).map(|s| s.kind) else {
                return Err(flag_err(f, format!("unknown flag: {}", f.name)));
            };
            if kind != FlagKind::List && given.iter().any(|(g, _)| g.name == f.name) {
                return Err(flag_err(f, format!("Duplicate flag specified: {}", f.name)));
            }
            match kind {
                FlagKind::Bool => {
                    if let Some(v) = &f.value {
                        if !matches!(v.to_ascii_lowercase().as_str(), "true" | "false" | "") {
                            return Err(flag_err(
                                f,
                                format!("expecting boolean value for flag {}, not: {v}", f.name),
                            ));
                        }
                    }
                }
                _ => {
                    if f.value.is_none() {
                        return Err(flag_err(f, format!("Missing a value on flag: {}", f.name)));
                    }
                }
            }
            given.push((f, kind));
        }
        Ok(Flags { given })
    }

    fn string(&self, name: &str) -> Option<(String, &'a Flag)> {
        self.given
            .iter()
            .find(|(f, _)| f.name == name)
            .map(|(f, _)| (f.value.clone().unwrap_or_default(), *f))
    }

    fn boolean(&self, name: &str) -> bool {
        self.given.iter().any(|(f, _)| {
            f.name == name
                && f.value
                    .as_deref()
                    .map(|v| !v.eq_ignore_ascii_case("false"))
                    .unwrap_or(true)
        })
    }

    fn list(&self, name: &str) -> Vec<(String, &'a Flag)> {
        self.given
            .iter()
            .filter(|(f, _)| f.name == name)
            .map(|(f, _)| (f.value.clone().unwrap_or_default(), *f))
            .collect()
    }
}

fn flag_err(f: &Flag, msg: String) -> ParseError {
    ParseError::new(ErrorKind::Flag, msg, f.span)
}

fn arg_err(inst: &Instruction, msg: String) -> ParseError {
    ParseError::new(ErrorKind::Argument, msg, inst.span)
}

fn at_least_one(inst: &Instruction) -> ParseError {
    arg_err(
        inst,
        format!("{} requires at least one argument", inst.name()),
    )
}

fn exactly_one(inst: &Instruction) -> ParseError {
    arg_err(
        inst,
        format!("{} requires exactly one argument", inst.name()),
    )
}

fn command_line(inst: &Instruction, args: &Args) -> Result<CommandLine, ParseError> {
    match args {
        Args::Json(j) => Ok(CommandLine::Exec(j.values.clone())),
        Args::Text(w) => Ok(CommandLine::Shell(w.text.clone())),
        _ => Err(at_least_one(inst)),
    }
}

fn words(args: &Args) -> Vec<Word> {
    match args {
        Args::Words(w) => w.clone(),
        Args::Text(w) => vec![w.clone()],
        Args::Json(j) => j
            .values
            .iter()
            .map(|v| Word {
                text: v.clone(),
                span: j.span,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Lowers one instruction to its typed form, checking flags and values.
pub fn lower(inst: &Instruction) -> Result<TypedInstruction, ParseError> {
    let Some(kind) = inst.kind() else {
        return Err(ParseError::new(
            ErrorKind::UnknownInstruction,
            Keyword::unknown_message(&inst.keyword),
            inst.span,
        ));
    };
    let flags = Flags::parse(inst, kind)?;
    let command = match kind {
        Keyword::From => {
            let w = words(&inst.args);
            let ok = w.len() == 1 || (w.len() == 3 && w[1].text.eq_ignore_ascii_case("as"));
            if !ok {
                return Err(arg_err(
                    inst,
                    "FROM requires either one or three arguments".into(),
                ));
            }
            let name = w.get(2).cloned();
            if let Some(n) = &name {
                if !n.text.contains('$') && !valid_stage_name(&n.text) {
                    return Err(ParseError::new(
                        ErrorKind::Argument,
                        format!(
                            "invalid name for build stage: {}, name can't start with a number or contain symbols",
                            crate::shell::go_quote(&n.text)
                        ),
                        n.span,
                    ));
                }
            }
            Command::From(From {
                platform: flags.string("platform").map(|(v, _)| v),
                image: w[0].clone(),
                name,
            })
        }
        Keyword::Run => {
            // A bare `RUN` (or one with only flags) is the shell form of an empty script, as
            // in BuildKit: the stage's shell runs `""`.
            let command = match &inst.args {
                Args::Empty => CommandLine::Shell(String::new()),
                args => command_line(inst, args)?,
            };
            let mut mounts = Vec::new();
            for (v, f) in flags.list("mount") {
                // Values with variables are checked once the frontend has expanded them.
                let mut m = parse_mount_expanding(&v, &mut |x| {
                    Ok((!x.contains('$')).then(|| x.to_string()))
                })
                .map_err(|e| flag_err(f, e))?;
                m.span = f.span;
                mounts.push(m);
            }
            // BuildKit reads both modes as written: `--network=$MODE` is refused too.
            let network = match flags.string("network") {
                None => None,
                Some((v, f)) => Some(NetworkMode::from_flag_value(&v).ok_or_else(|| {
                    flag_err(
                        f,
                        format!("invalid network mode {}", crate::shell::go_quote(&v)),
                    )
                })?),
            };
            let security = match flags.string("security") {
                None => None,
                Some((v, f)) => Some(SecurityMode::from_flag_value(&v).ok_or_else(|| {
                    flag_err(
                        f,
                        format!("security mode {} not supported", crate::shell::go_quote(&v)),
                    )
                })?),
            };
            Command::Run(Run {
                command,
                mounts,
                network,
                security,
                heredocs: inst.heredocs.clone(),
            })
        }
        Keyword::Cmd => Command::Cmd(command_line(inst, &inst.args)?),
        Keyword::Entrypoint => Command::Entrypoint(command_line(inst, &inst.args)?),
        Keyword::Shell => match &inst.args {
            Args::Json(j) if !j.values.is_empty() => Command::Shell(j.values.clone()),
            Args::Empty => return Err(at_least_one(inst)),
            _ => {
                return Err(arg_err(
                    inst,
                    "SHELL requires the arguments to be in JSON form".into(),
                ))
            }
        },
        Keyword::Env | Keyword::Label => {
            let Args::KeyValues(kvs) = &inst.args else {
                return Err(at_least_one(inst));
            };
            let mut pairs = Vec::new();
            for kv in kvs {
                if kind == Keyword::Env && kv.key.text.is_empty() {
                    return Err(ParseError::new(
                        ErrorKind::Argument,
                        "ENV names can not be blank",
                        kv.key.span,
                    ));
                }
                pairs.push(Pair {
                    key: kv.key.clone(),
                    value: kv.value.clone(),
                });
            }
            if kind == Keyword::Env {
                Command::Env(pairs)
            } else {
                Command::Label(pairs)
            }
        }
        Keyword::Expose => {
            let w = words(&inst.args);
            if w.is_empty() {
                return Err(at_least_one(inst));
            }
            Command::Expose(w)
        }
        Keyword::Volume => {
            let w = words(&inst.args);
            if w.is_empty() {
                return Err(at_least_one(inst));
            }
            if w.iter().any(|v| v.text.trim().is_empty()) {
                return Err(arg_err(
                    inst,
                    "VOLUME specified can not be an empty string".into(),
                ));
            }
            Command::Volume(w)
        }
        Keyword::User | Keyword::Workdir | Keyword::Stopsignal | Keyword::Maintainer => {
            let Args::Text(w) = &inst.args else {
                return Err(exactly_one(inst));
            };
            match kind {
                Keyword::User => Command::User(w.clone()),
                Keyword::Workdir => Command::Workdir(w.clone()),
                Keyword::Stopsignal => Command::Stopsignal(w.clone()),
                _ => Command::Maintainer(w.clone()),
            }
        }
        Keyword::Arg => {
            let w = words(&inst.args);
            if w.is_empty() {
                return Err(at_least_one(inst));
            }
            let mut decls = Vec::new();
            for word in w {
                let (name, default) = match word.text.split_once('=') {
                    Some((n, d)) => (n.to_string(), Some(d.to_string())),
                    None => (word.text.clone(), None),
                };
                if name.is_empty() {
                    return Err(ParseError::new(
                        ErrorKind::Argument,
                        "ARG names can not be blank",
                        word.span,
                    ));
                }
                decls.push(ArgDecl {
                    name,
                    default,
                    span: word.span,
                });
            }
            Command::Arg(decls)
        }
        Keyword::Onbuild => {
            let Args::Onbuild(child) = &inst.args else {
                return Err(at_least_one(inst));
            };
            match child.kind() {
                Some(Keyword::Onbuild) => {
                    return Err(arg_err(
                        inst,
                        "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".into(),
                    ))
                }
                Some(k @ (Keyword::From | Keyword::Maintainer)) => {
                    return Err(arg_err(
                        inst,
                        format!("{} isn't allowed as an ONBUILD trigger", k.as_str()),
                    ))
                }
                _ => {}
            }
            // BuildKit keeps the trigger as the text after the ONBUILD keyword.
            let text = inst.original.trim();
            let rest = text.get(inst.keyword.len()..).unwrap_or("").trim();
            Command::Onbuild(rest.to_string())
        }
        Keyword::Healthcheck => lower_healthcheck(inst, &flags)?,
        Keyword::Add | Keyword::Copy => {
            let w = words(&inst.args);
            if w.len() < 2 && (w.len() != 1 || inst.heredocs.is_empty()) {
                return Err(arg_err(
                    inst,
                    format!(
                        "{} requires at least two arguments, but only one was provided. Destination could not be determined",
                        inst.name()
                    ),
                ));
            }
            let heredoc_names: Vec<bool> = w
                .iter()
                .map(|x| {
                    crate::parser::parse_heredoc(&x.text)
                        .ok()
                        .flatten()
                        .is_some()
                })
                .collect();
            let (dest, srcs) = w.split_last().ok_or_else(|| at_least_one(inst))?;
            let sources = srcs
                .iter()
                .zip(&heredoc_names)
                .filter(|(_, h)| !**h || inst.is_json())
                .map(|(s, _)| s.text.clone())
                .collect();
            if let Some((v, f)) = flags.string("from") {
                if from_has_variable(&v) {
                    return Err(flag_err(f, COPY_FROM_VARIABLE.to_string()));
                }
            }
            if let Some((v, f)) = flags.string("chmod") {
                if !v.contains('$') && !valid_chmod(&v) {
                    return Err(flag_err(f, format!("invalid chmod parameter: {v}")));
                }
            }
            Command::from_add_copy(
                kind,
                AddCopy {
                    sources,
                    dest: dest.text.clone(),
                    heredocs: inst.heredocs.clone(),
                    from: flags.string("from").map(|(v, _)| v),
                    chown: flags.string("chown").map(|(v, _)| v),
                    chmod: flags.string("chmod").map(|(v, _)| v),
                    link: flags.boolean("link"),
                    parents: flags.boolean("parents"),
                    exclude: flags.list("exclude").into_iter().map(|(v, _)| v).collect(),
                    keep_git_dir: flags.boolean("keep-git-dir"),
                    checksum: flags.string("checksum").map(|(v, _)| v),
                    json: inst.is_json(),
                },
            )
        }
    };
    Ok(TypedInstruction {
        command,
        keyword: inst.keyword.clone(),
        span: inst.span,
    })
}

impl Command {
    fn from_add_copy(kind: Keyword, a: AddCopy) -> Command {
        if kind == Keyword::Add {
            Command::Add(a)
        } else {
            Command::Copy(a)
        }
    }
}

fn lower_healthcheck(inst: &Instruction, flags: &Flags) -> Result<Command, ParseError> {
    let Args::Healthcheck { kind, command } = &inst.args else {
        return Err(at_least_one(inst));
    };
    match kind.text.to_uppercase().as_str() {
        "NONE" => {
            if !matches!(**command, Args::Empty) {
                return Err(arg_err(inst, "HEALTHCHECK NONE takes no arguments".into()));
            }
            if let Some((f, _)) = flags.given.first() {
                return Err(flag_err(f, "HEALTHCHECK NONE takes no flags".into()));
            }
            Ok(Command::Healthcheck(Healthcheck::None))
        }
        "CMD" => {
            let cmd = command_line(inst, command)?;
            let dur = |name: &str| -> Result<Option<Duration>, ParseError> {
                let Some((v, f)) = flags.string(name) else {
                    return Ok(None);
                };
                let d = parse_go_duration(&v).ok_or_else(|| {
                    flag_err(
                        f,
                        format!("time: invalid duration {}", crate::shell::go_quote(&v)),
                    )
                })?;
                if !d.is_zero() && d < Duration::from_millis(1) {
                    return Err(flag_err(
                        f,
                        format!("Interval \"{name}\" cannot be less than 1ms"),
                    ));
                }
                Ok(Some(d))
            };
            let retries = match flags.string("retries") {
                None => None,
                Some((v, f)) => {
                    let n: i64 = v.parse().map_err(|_| {
                        flag_err(
                            f,
                            format!(
                                "strconv.ParseInt: parsing {}: invalid syntax",
                                crate::shell::go_quote(&v)
                            ),
                        )
                    })?;
                    if n < 0 {
                        return Err(flag_err(f, "--retries cannot be negative".into()));
                    }
                    Some(n)
                }
            };
            Ok(Command::Healthcheck(Healthcheck::Cmd {
                command: cmd,
                interval: dur("interval")?,
                timeout: dur("timeout")?,
                start_period: dur("start-period")?,
                start_interval: dur("start-interval")?,
                retries,
            }))
        }
        other => Err(ParseError::new(
            ErrorKind::Argument,
            format!(
                "Unknown type {} in HEALTHCHECK (try CMD)",
                crate::shell::go_quote(other)
            ),
            kind.span,
        )),
    }
}

/// BuildKit's stage name rule: `^[a-z][a-z0-9-_.]*$` after lower-casing.
fn valid_stage_name(name: &str) -> bool {
    let lower = name.to_lowercase();
    let mut chars = lower.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '-' | '_' | '.'))
}

/// `--chmod` accepts an octal mode (e.g. `755`, `0644`) or a symbolic mode (`u+x,g-w`).
fn valid_chmod(v: &str) -> bool {
    if !v.is_empty() && v.chars().all(|c| ('0'..='7').contains(&c)) {
        return u32::from_str_radix(v, 8).is_ok_and(|m| m <= 0o7777);
    }
    !v.is_empty()
        && v.split(',').all(|clause| {
            let ops = clause.trim_start_matches(['u', 'g', 'o', 'a']);
            !ops.is_empty()
                && ops.starts_with(['+', '-', '='])
                && ops.chars().all(|c| "+-=rwxXst".contains(c))
        })
}

/// Go's `time.ParseDuration` (units ns, us, µs, ms, s, m, h; sums like `1m30s`).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num = &rest[..num_len];
        if num.is_empty() || num == "." {
            return None;
        }
        let value: f64 = num.parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let nanos = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += value * nanos;
    }
    if neg && total > 0.0 {
        return None;
    }
    if total > u64::MAX as f64 {
        return None;
    }
    Some(Duration::from_nanos(total as u64))
}

/// Splits a `--mount` value like Go's `encoding/csv` (commas; `"..."` fields with `""`).
fn split_csv(value: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars().peekable();
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if at_start && c == '"' {
            loop {
                match chars.next() {
                    None => {
                        return Err(format!(
                        "parse error on line 1: extraneous or missing \" in quoted-field ({value})"
                    ))
                    }
                    Some('"') => {
                        if chars.peek() == Some(&'"') {
                            chars.next();
                            cur.push('"');
                        } else {
                            break;
                        }
                    }
                    Some(x) => cur.push(x),
                }
            }
            at_start = false;
            continue;
        }
        if c == ',' {
            out.push(std::mem::take(&mut cur));
            at_start = true;
            continue;
        }
        cur.push(c);
        at_start = false;
    }
    out.push(cur);
    Ok(out)
}

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "t" | "true" => Ok(true),
        "0" | "f" | "false" => Ok(false),
        _ => Err(format!("invalid value for {key}: {v}")),
    }
}

/// BuildKit's message for `from=` with a variable in a `--mount` (it never expands it there).
pub const MOUNT_FROM_VARIABLE: &str = "'from' doesn't support variable expansion, define alias stage instead \
     (declare a global ARG before the first FROM, add a stage `FROM ${ARG} AS alias`, and mount from=alias)";

/// BuildKit's message for `COPY --from=` with a variable.
pub const COPY_FROM_VARIABLE: &str =
    "variable expansion is not supported for --from, define a new stage \
     with FROM using ARG from global scope as a workaround (a global ARG before the first FROM, \
     `FROM ${ARG} AS alias`, then COPY --from=alias)";

/// BuildKit refuses a `from` value in which `$` is followed by anything (its check is the
/// regular expression `\$.` on the value as written): the stage graph is known before
/// any variable has a value.
pub fn from_has_variable(value: &str) -> bool {
    value
        .char_indices()
        .any(|(i, c)| c == '$' && value[i + 1..].chars().next().is_some())
}

/// Parses one `--mount` value (variables already expanded, or none) into a [`Mount`], with
/// BuildKit's keys and defaults. The returned span is empty; [`lower`] fills it.
pub fn parse_mount(value: &str) -> Result<Mount, String> {
    parse_mount_expanding(value, &mut |v| Ok(Some(v.to_string())))
}

/// Parses one `--mount` value as written, as BuildKit does: split into `key=value` fields
/// first, then expand each value on its own with `expand` (so a value may hold a comma).
/// Keys without `=` (`ro`, `rw`, `required`) are never expanded, and `from` must not hold a
/// variable at all ([`MOUNT_FROM_VARIABLE`]). `expand` may answer `None` ("not known yet"):
/// the field is left out and the checks that need every field are skipped, as BuildKit
/// does when it reads a mount before the build args are known.
pub fn parse_mount_expanding(
    value: &str,
    expand: &mut dyn FnMut(&str) -> Result<Option<String>, String>,
) -> Result<Mount, String> {
    let raw_fields = split_csv(value)?;
    let mut fields = Vec::with_capacity(raw_fields.len());
    let mut deferred = false;
    for f in &raw_fields {
        match f.split_once('=') {
            Some((k, v)) => {
                if k.trim().eq_ignore_ascii_case("from") && from_has_variable(v) {
                    return Err(MOUNT_FROM_VARIABLE.to_string());
                }
                match expand(v)? {
                    Some(v) => fields.push(format!("{k}={v}")),
                    None => deferred = true,
                }
            }
            None => fields.push(f.clone()),
        }
    }
    let mut m = Mount {
        kind: MountType::Bind,
        target: None,
        source: None,
        from: None,
        read_only: false,
        id: None,
        sharing: None,
        mode: None,
        uid: None,
        gid: None,
        size: None,
        required: false,
        env: None,
        span: Span::default(),
    };
    // The type decides defaults, so find it first.
    for f in &fields {
        if let Some(("type", t)) = f.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
            m.kind = match t.to_ascii_lowercase().as_str() {
                "bind" => MountType::Bind,
                "cache" => MountType::Cache,
                "tmpfs" => MountType::Tmpfs,
                "secret" => MountType::Secret,
                "ssh" => MountType::Ssh,
                _ => {
                    return Err(format!(
                        "unsupported mount type {}",
                        crate::shell::go_quote(t)
                    ))
                }
            };
        }
    }
    let mut rw_given = None;
    for f in &fields {
        let f = f.trim();
        if f.is_empty() {
            continue;
        }
        let (key, val) = match f.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.trim())),
            None => (f.to_ascii_lowercase(), None),
        };
        let need = |v: Option<&str>| -> Result<String, String> {
            v.map(str::to_string)
                .ok_or_else(|| format!("invalid field '{f}' must be a key=value pair"))
        };
        let num = |v: Option<&str>, radix: u32| -> Result<u32, String> {
            let v = need(v)?;
            u32::from_str_radix(&v, radix).map_err(|_| format!("invalid value for {key}: {v}"))
        };
        match key.as_str() {
            "type" => {}
            "target" | "dst" | "destination" => m.target = Some(need(val)?),
            "source" | "src" => m.source = Some(need(val)?),
            "from" => m.from = Some(need(val)?),
            "readonly" | "ro" => {
                rw_given = Some(
                    !val.map(|v| parse_bool(&key, v))
                        .transpose()?
                        .unwrap_or(true),
                )
            }
            "readwrite" | "rw" => {
                rw_given = Some(
                    val.map(|v| parse_bool(&key, v))
                        .transpose()?
                        .unwrap_or(true),
                )
            }
            "id" => m.id = Some(need(val)?),
            "sharing" => {
                let v = need(val)?;
                m.sharing = Some(CacheSharing::from_flag_value(&v).ok_or_else(|| {
                    format!("unsupported sharing value {}", crate::shell::go_quote(&v))
                })?);
            }
            "mode" => m.mode = Some(num(val, 8)?),
            "uid" => m.uid = Some(num(val, 10)?),
            "gid" => m.gid = Some(num(val, 10)?),
            "size" => {
                let v = need(val)?;
                m.size =
                    Some(parse_size(&v).ok_or_else(|| format!("invalid value for size: {v}"))?);
            }
            "required" => {
                m.required = val
                    .map(|v| parse_bool(&key, v))
                    .transpose()?
                    .unwrap_or(true);
            }
            "env" => m.env = Some(need(val)?),
            _ => return Err(format!("unexpected key '{key}' in '{f}'")),
        }
    }
    // Bind mounts default to read-only; cache and tmpfs are writable.
    m.read_only = match rw_given {
        Some(rw) => !rw,
        None => m.kind == MountType::Bind,
    };
    // Without `target=` a bind, cache or tmpfs mount goes to the stage's WORKDIR, and a
    // relative target is joined to it: the frontend resolves both (only `/` is refused).
    if deferred {
        return Ok(m);
    }
    if m.kind == MountType::Secret && m.id.is_none() && m.target.is_none() && m.env.is_none() {
        return Err("one of id, target or env is required for secret mounts".to_string());
    }
    if m.sharing.is_some() && m.kind != MountType::Cache {
        return Err("sharing is only valid for cache mounts".to_string());
    }
    if m.size.is_some() && m.kind != MountType::Tmpfs {
        return Err("size is only valid for tmpfs mounts".to_string());
    }
    if m.env.is_some() && m.kind != MountType::Secret {
        return Err("env is only valid for secret mounts".to_string());
    }
    Ok(m)
}

/// Sizes like `64m`, `1g`, `1024`, `10kb` (docker's units: powers of 1024).
fn parse_size(v: &str) -> Option<u64> {
    let lower = v.to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &lower[digits.len()..];
    let n: f64 = digits.parse().ok()?;
    let mult: f64 = match unit {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024f64.powi(4),
        _ => return None,
    };
    let total = n * mult;
    (total >= 0.0 && total < u64::MAX as f64).then_some(total as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse;

    fn one(src: &str) -> Result<TypedInstruction, ParseError> {
        let df = parse(src).expect("parses");
        lower(&df.instructions[0])
    }

    #[test]
    fn run_mount_options_are_parsed() {
        let t = one("RUN --mount=type=cache,target=/root/.cache,sharing=locked,id=pip,mode=0755,uid=1 --network=none pip install x\n").unwrap();
        let Command::Run(r) = t.command else {
            panic!("not RUN")
        };
        assert_eq!(r.mounts[0].kind, MountType::Cache);
        assert_eq!(r.mounts[0].sharing, Some(CacheSharing::Locked));
        assert_eq!(r.mounts[0].mode, Some(0o755));
        assert!(!r.mounts[0].read_only);
        assert_eq!(r.network, Some(NetworkMode::None));
    }

    #[test]
    fn unknown_flag_is_an_error_at_the_flag() {
        let e = one("COPY --frm=a x y\n").unwrap_err();
        assert_eq!(e.message, "unknown flag: frm");
        assert_eq!((e.span.start.line, e.span.start.column), (1, 6));
    }

    #[test]
    fn bad_mount_value_is_an_error() {
        let e = one("RUN --mount=type=cache,sharing=sometimes,target=/x a\n").unwrap_err();
        assert!(e.message.contains("sharing"), "{}", e.message);
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_go_duration("5"), None);
    }
}
