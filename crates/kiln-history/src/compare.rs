//! Comparing two builds: which steps got slower or faster, and why a step ran in the second
//! build — the inputs of its cache key that differ (a file, a build arg, the base image), or
//! the steps it depends on that changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use crate::record::{BuildRecord, CacheResult, StepRecord};

/// One input of a step's cache key that differs between two builds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct InputChange {
    /// The input's name as recorded (`file:PATH`, `arg:NAME`, `base`, ...).
    pub input: String,
    /// Its value in the first build (`None`: absent).
    pub before: Option<String>,
    /// Its value in the second build (`None`: absent).
    pub after: Option<String>,
}

impl fmt::Display for InputChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, name) = match self.input.split_once(':') {
            Some(("file", p)) => ("file", p),
            Some(("arg", a)) => ("build arg", a),
            Some(("env", e)) => ("env", e),
            Some(("secret", s)) => ("secret", s),
            Some((k, v)) => (k, v),
            None if self.input == "base" => return self.fmt_base(f),
            None => ("", self.input.as_str()),
        };
        let what = if kind.is_empty() {
            name.to_string()
        } else {
            format!("{kind} {name}")
        };
        match (&self.before, &self.after) {
            (None, Some(_)) => write!(f, "{what} added"),
            (Some(_), None) => write!(f, "{what} removed"),
            (Some(a), Some(b)) if kind == "file" => {
                write!(f, "{what} changed ({} → {})", short(a), short(b))
            }
            (Some(a), Some(b)) => write!(f, "{what} changed {a}→{b}"),
            (None, None) => write!(f, "{what} changed"),
        }
    }
}

impl InputChange {
    fn fmt_base(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.before, &self.after) {
            (Some(a), Some(b)) => write!(f, "base image changed ({} → {})", short(a), short(b)),
            _ => write!(f, "base image changed"),
        }
    }
}

fn short(digest: &str) -> String {
    let hex = digest.split_once(':').map(|(_, h)| h).unwrap_or(digest);
    hex.chars().take(12).collect()
}

/// How one step differs between two builds.
#[derive(Debug, Clone, PartialEq)]
pub struct StepChange {
    /// The step's description (how steps are matched across builds).
    pub description: String,
    /// Its stage.
    pub stage: String,
    /// Cache result in the first build (`None`: not in it).
    pub before: Option<CacheResult>,
    /// Cache result in the second build.
    pub after: CacheResult,
    /// Run time in the first build, if it ran.
    pub before_ms: Option<u64>,
    /// Run time in the second build, if it ran.
    pub after_ms: Option<u64>,
    /// Inputs of its own key that differ.
    pub changed_inputs: Vec<InputChange>,
    /// Descriptions of the steps it depends on whose keys changed.
    pub changed_deps: Vec<String>,
    /// The root causes: changed inputs of this step or of any step above it.
    pub root_causes: Vec<InputChange>,
    /// True when its cache key is unchanged but it ran anyway (cache missing or disabled).
    pub same_key_rerun: bool,
}

impl StepChange {
    /// True when it was a cache hit in the first build and ran in the second.
    pub fn lost_cache_hit(&self) -> bool {
        matches!(&self.before, Some(b) if b.is_cached()) && self.after == CacheResult::Run
    }

    /// One sentence: why it ran in the second build.
    pub fn reason(&self) -> String {
        if self.before.is_none() {
            return "new step".into();
        }
        if !self.changed_inputs.is_empty() {
            return join(&self.changed_inputs);
        }
        if !self.changed_deps.is_empty() {
            let causes = if self.root_causes.is_empty() {
                String::new()
            } else {
                format!(": {}", join(&self.root_causes))
            };
            return format!(
                "depends on changed step {}{causes}",
                self.changed_deps.join(", ")
            );
        }
        if self.same_key_rerun {
            return "same cache key, but no cache result was available (pruned, --no-cache, or a runner without the cache)".into();
        }
        "its definition changed (command, options or Dockerfile line)".into()
    }
}

fn join(changes: &[InputChange]) -> String {
    changes
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The difference between two builds.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// First build's id.
    pub before_id: String,
    /// Second build's id.
    pub after_id: String,
    /// Wall times in ms.
    pub before_ms: u64,
    /// Wall time of the second build in ms.
    pub after_ms: u64,
    /// Every step of the second build that ran, with the reason.
    pub ran: Vec<StepChange>,
    /// Steps that ran in both builds, with their durations (for slower/faster).
    pub timed: Vec<StepChange>,
    /// Descriptions of steps only in the first build.
    pub removed: Vec<String>,
}

impl Comparison {
    /// Steps that ran in both and took at least 20% and 100 ms longer in the second build.
    pub fn slower(&self) -> Vec<&StepChange> {
        self.timed
            .iter()
            .filter(|c| delta(c) > 0 && significant(c))
            .collect()
    }

    /// Steps that ran in both and took at least 20% and 100 ms less in the second build.
    pub fn faster(&self) -> Vec<&StepChange> {
        self.timed
            .iter()
            .filter(|c| delta(c) < 0 && significant(c))
            .collect()
    }

    /// The comparison as text for a terminal.
    pub fn render_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "build {} ({}) → build {} ({})",
            self.before_id,
            fmt_ms(self.before_ms),
            self.after_id,
            fmt_ms(self.after_ms)
        );
        let lost: Vec<_> = self.ran.iter().filter(|c| c.lost_cache_hit()).collect();
        let _ = writeln!(
            out,
            "\n{} step(s) ran in the second build, {} of them lost a cache hit:",
            self.ran.len(),
            lost.len()
        );
        for c in &self.ran {
            let mark = if c.lost_cache_hit() {
                "lost cache"
            } else {
                "ran"
            };
            let _ = writeln!(
                out,
                "  {:<10} {}\n             why: {}",
                mark,
                c.description,
                c.reason()
            );
        }
        for (title, list) in [("slower", self.slower()), ("faster", self.faster())] {
            if list.is_empty() {
                continue;
            }
            let _ = writeln!(out, "\n{title}:");
            for c in list {
                let _ = writeln!(
                    out,
                    "  {:>9} → {:>9}  {}",
                    fmt_ms(c.before_ms.unwrap_or(0)),
                    fmt_ms(c.after_ms.unwrap_or(0)),
                    c.description
                );
            }
        }
        if !self.removed.is_empty() {
            let _ = writeln!(out, "\nonly in the first build:");
            for d in &self.removed {
                let _ = writeln!(out, "  {d}");
            }
        }
        out
    }
}

fn delta(c: &StepChange) -> i64 {
    c.after_ms.unwrap_or(0) as i64 - c.before_ms.unwrap_or(0) as i64
}

fn significant(c: &StepChange) -> bool {
    let d = delta(c).unsigned_abs();
    let base = c.before_ms.unwrap_or(0).max(1);
    d >= 100 && d * 5 >= base
}

/// Formats milliseconds as `850ms`, `12.3s` or `4m05s`.
pub(crate) fn fmt_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    }
}

/// Matches the steps of two builds by description (in order, for repeated descriptions).
fn match_steps<'a>(
    before: &'a BuildRecord,
    after: &'a BuildRecord,
) -> HashMap<usize, &'a StepRecord> {
    let mut by_desc: BTreeMap<&str, Vec<&StepRecord>> = BTreeMap::new();
    for s in &before.steps {
        by_desc.entry(s.description.as_str()).or_default().push(s);
    }
    let mut map = HashMap::new();
    for s in &after.steps {
        if let Some(list) = by_desc.get_mut(s.description.as_str()) {
            if !list.is_empty() {
                map.insert(s.index, list.remove(0));
            }
        }
    }
    map
}

fn diff_inputs(a: &StepRecord, b: &StepRecord) -> Vec<InputChange> {
    let keys: BTreeSet<&String> = a.inputs.keys().chain(b.inputs.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (a.inputs.get(k), b.inputs.get(k));
            (x != y).then(|| InputChange {
                input: k.clone(),
                before: x.cloned(),
                after: y.cloned(),
            })
        })
        .collect()
}

/// Compares build `before` with build `after`.
pub fn compare_records(before: &BuildRecord, after: &BuildRecord) -> Comparison {
    let matched = match_steps(before, after);
    // Per step of `after`: did its key change, and its root causes. Steps are visited in index
    // order; inputs precede their consumers (the solver refuses anything else), so deps are done.
    let mut key_changed: HashMap<usize, bool> = HashMap::new();
    let mut causes: HashMap<usize, BTreeSet<InputChange>> = HashMap::new();
    let mut ran = Vec::new();
    let mut timed = Vec::new();
    let mut steps: Vec<&StepRecord> = after.steps.iter().collect();
    steps.sort_by_key(|s| s.index);
    for s in steps {
        let old = matched.get(&s.index).copied();
        let changed_inputs = old.map(|o| diff_inputs(o, s)).unwrap_or_default();
        let changed_deps: Vec<&StepRecord> = s
            .depends_on
            .iter()
            .filter(|d| key_changed.get(d).copied().unwrap_or(false))
            .filter_map(|d| after.step(*d))
            .collect();
        let mut root: BTreeSet<InputChange> = changed_inputs.iter().cloned().collect();
        for d in &changed_deps {
            if let Some(c) = causes.get(&d.index) {
                root.extend(c.iter().cloned());
            }
        }
        let keys_differ = match (old.and_then(|o| o.cache_key.as_ref()), s.cache_key.as_ref()) {
            (Some(a), Some(b)) => a != b,
            _ => !changed_inputs.is_empty() || !changed_deps.is_empty(),
        };
        let changed = old.is_none() || keys_differ;
        key_changed.insert(s.index, changed);
        causes.insert(s.index, root.clone());
        let change = StepChange {
            description: s.description.clone(),
            stage: s.stage.clone(),
            before: old.map(|o| o.cache.clone()),
            after: s.cache.clone(),
            before_ms: old.and_then(|o| o.executed().then(|| o.duration_ms()).flatten()),
            after_ms: s.executed().then(|| s.duration_ms()).flatten(),
            changed_inputs,
            changed_deps: changed_deps.iter().map(|d| d.description.clone()).collect(),
            root_causes: root.into_iter().collect(),
            same_key_rerun: old.is_some() && !changed,
        };
        if old.is_some_and(|o| o.executed()) && s.executed() {
            timed.push(change.clone());
        }
        if s.executed() {
            ran.push(change);
        }
    }
    let kept: BTreeSet<usize> = matched.values().map(|s| s.index).collect();
    let removed = before
        .steps
        .iter()
        .filter(|s| !kept.contains(&s.index))
        .map(|s| s.description.clone())
        .collect();
    Comparison {
        before_id: before.id.clone(),
        after_id: after.id.clone(),
        before_ms: before.duration_ms(),
        after_ms: after.duration_ms(),
        ran,
        timed,
        removed,
    }
}
