//! Splitting a Dockerfile into its global ARGs and stages, and the `--call targets` view.

use kiln_dockerfile::instructions::flag_spec;
use kiln_dockerfile::{Args, Dockerfile, Instruction, Keyword, Span};
use serde::Serialize;

use crate::error::FrontendError;

/// One `FROM ... [AS name]` and the instructions up to the next FROM.
#[derive(Debug, Clone)]
pub(crate) struct StageDecl<'a> {
    pub index: usize,
    /// Lower-cased name.
    pub name: Option<String>,
    /// The base as written (before expansion).
    pub base: String,
    /// `--platform` as written.
    pub platform: Option<String>,
    pub from: &'a Instruction,
    pub instructions: Vec<&'a Instruction>,
}

impl StageDecl<'_> {
    /// `name` or `stage-N`, as BuildKit labels steps.
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", self.index))
    }
}

/// The global ARGs (before the first FROM) and the stages.
pub(crate) struct Split<'a> {
    pub globals: Vec<&'a Instruction>,
    pub stages: Vec<StageDecl<'a>>,
}

pub(crate) fn split_stages(df: &Dockerfile) -> Result<Split<'_>, FrontendError> {
    let mut globals = Vec::new();
    let mut stages: Vec<StageDecl> = Vec::new();
    for inst in &df.instructions {
        let Some(kind) = inst.kind() else {
            return Err(FrontendError::new(
                Keyword::unknown_message(&inst.keyword),
                keyword_span(inst),
            ));
        };
        if kind == Keyword::From {
            stages.push(parse_from(inst, stages.len())?);
            continue;
        }
        match stages.last_mut() {
            Some(s) => s.instructions.push(inst),
            None if kind == Keyword::Arg => globals.push(inst),
            None => {
                return Err(FrontendError::new(
                    format!(
                        "{} instruction before the first FROM: only ARG may come before FROM",
                        inst.name()
                    ),
                    keyword_span(inst),
                ))
            }
        }
    }
    if stages.is_empty() {
        return Err(FrontendError::global(
            "the Dockerfile has no FROM instruction: nothing to build",
        ));
    }
    Ok(Split { globals, stages })
}

pub(crate) fn keyword_span(inst: &Instruction) -> Span {
    let mut s = inst.span;
    s.end = s.start;
    s.end.column += inst.keyword.chars().count();
    s
}

fn parse_from(inst: &Instruction, index: usize) -> Result<StageDecl<'_>, FrontendError> {
    let mut platform = None;
    for f in &inst.flags {
        // `--platform` is FROM's one flag; it is expanded with the global ARGs when lowered.
        if flag_spec(Keyword::From, &f.name).is_none() {
            return Err(FrontendError::new(
                format!("unknown flag: --{} (FROM accepts --platform)", f.name),
                f.span,
            ));
        }
        platform = Some(f.value.clone().unwrap_or_default());
    }
    let words: Vec<&str> = match &inst.args {
        Args::Words(w) => w.iter().map(|w| w.text.as_str()).collect(),
        Args::Text(w) => w.text.split_whitespace().collect(),
        _ => Vec::new(),
    };
    let (base, name) = match words.as_slice() {
        [base] => (*base, None),
        [base, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => (*base, Some(*name)),
        [] => {
            return Err(FrontendError::new(
                "FROM requires an image name or a stage name",
                inst.span,
            ))
        }
        _ => {
            return Err(FrontendError::new(
                "FROM requires either one argument, or three: FROM <source> [AS <name>]",
                inst.span,
            ))
        }
    };
    let name = match name {
        Some(n) => {
            let lower = n.to_ascii_lowercase();
            if !valid_stage_name(&lower) {
                return Err(FrontendError::new(
                    format!("invalid name for build stage: {n:?}, name can't start with a number or contain symbols"),
                    inst.span,
                ));
            }
            Some(lower)
        }
        None => None,
    };
    Ok(StageDecl {
        index,
        name,
        base: base.to_string(),
        platform,
        from: inst,
        instructions: Vec::new(),
    })
}

/// BuildKit's stage-name rule: `^[a-z][a-z0-9-_.]*$`.
fn valid_stage_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next().is_some_and(|f| f.is_ascii_lowercase())
        && c.all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || "-_.".contains(x))
}

/// One stage as `--call targets` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetInfo {
    /// Stage name (lower-cased); `None` for an unnamed stage, which is still listed.
    pub name: Option<String>,
    /// Index in the Dockerfile.
    pub index: usize,
    /// Its description: the comment line above its FROM that starts with its name, minus the name.
    pub description: String,
    /// The base as written.
    pub base: String,
    /// `--platform` as written.
    pub platform: Option<String>,
    /// True for the last stage (built when no target is given).
    pub default: bool,
    /// Line of its FROM.
    pub line: usize,
    /// Last line of its FROM (a continued FROM spans several).
    pub end_line: usize,
}

/// The stages of a Dockerfile for `--call targets`.
pub fn targets(df: &Dockerfile) -> Result<Vec<TargetInfo>, FrontendError> {
    let split = split_stages(df)?;
    let last = split.stages.len() - 1;
    Ok(split
        .stages
        .iter()
        .map(|s| TargetInfo {
            name: s.name.clone(),
            index: s.index,
            description: description_of(s.from),
            base: s.base.clone(),
            platform: s.platform.clone(),
            default: s.index == last,
            line: s.from.span.start.line,
            end_line: s.from.span.end.line.max(s.from.span.start.line),
        })
        .collect())
}

/// BuildKit's description of a stage or ARG: the first comment line right above it that
/// starts with the stage's (or ARG's) name and a space, with that prefix removed
/// (`# build compiles the app` above `FROM ... AS build` describes `build` as "compiles the
/// app"). Other comments describe nothing. For an ARG declaring several names, the first name
/// with such a line wins.
pub(crate) fn description_of(inst: &Instruction) -> String {
    let names: Vec<String> = match (inst.kind(), &inst.args) {
        (Some(Keyword::From), Args::Words(w)) if w.len() == 3 => {
            vec![w[2].text.to_ascii_lowercase()]
        }
        (Some(Keyword::Arg), Args::Words(w)) => w
            .iter()
            .map(|w| w.text.split('=').next().unwrap_or_default().to_string())
            .collect(),
        (Some(Keyword::Arg), Args::KeyValues(kv)) => {
            kv.iter().map(|p| p.key.text.clone()).collect()
        }
        _ => Vec::new(),
    };
    names
        .iter()
        .filter(|n| !n.is_empty())
        .find_map(|n| {
            let prefix = format!("{n} ");
            inst.comments
                .iter()
                .map(|c| c.trim())
                .filter(|c| !is_directive(c))
                .find_map(|c| c.strip_prefix(prefix.as_str()))
        })
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `syntax=`, `escape=`, `check=` comment lines are parser directives, not descriptions.
fn is_directive(c: &str) -> bool {
    c.split_once('=').is_some_and(|(k, _)| {
        matches!(
            k.trim().to_ascii_lowercase().as_str(),
            "syntax" | "escape" | "check"
        )
    })
}
