//! `--dry-run`: the steps a target needs, each with its stage and the steps it waits on.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::graph::{BuildGraph, Op};

/// One step of a dry run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanStep {
    /// Vertex index (`#N` in the text form).
    pub id: u32,
    /// Stage name (`stage-N` when unnamed); `None` for shared sources such as the context.
    pub stage: Option<String>,
    /// Kind of operation: image, local, http, oci-layout, exec, copy, mkdir, merge.
    pub op: &'static str,
    /// e.g. `[app 3/8] COPY --from=npm-deps /deps/public ./public`.
    pub description: String,
    /// Ids of the steps this one waits on.
    pub waits_on: Vec<u32>,
    /// Dockerfile line, if the step comes from an instruction.
    pub line: Option<u32>,
}

/// One stage of a dry run and the stages it depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanStage {
    /// Stage name (`stage-N` when unnamed).
    pub name: String,
    /// Names of the stages whose results it uses.
    pub depends_on: Vec<String>,
}

/// What `kiln build --dry-run` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The target stage.
    pub target: String,
    /// Needed stages in Dockerfile order (the target last).
    pub stages: Vec<PlanStage>,
    /// Steps in an order where every step follows the steps it waits on.
    pub steps: Vec<PlanStep>,
}

/// Builds the dry-run plan of a graph.
pub fn plan(graph: &BuildGraph) -> Plan {
    let stage_name = |s: &crate::graph::StageResult| {
        s.name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", s.index))
    };
    let steps: Vec<PlanStep> = graph
        .vertices
        .iter()
        .enumerate()
        .map(|(i, v)| PlanStep {
            id: i as u32,
            stage: v.meta.stage.clone(),
            op: match v.op {
                Op::Image(_) => "image",
                Op::Local(_) => "local",
                Op::Http(_) => "http",
                Op::OciLayout(_) => "oci-layout",
                Op::Exec(_) => "exec",
                Op::Copy(_) => "copy",
                Op::Mkdir(_) => "mkdir",
                Op::Merge(_) => "merge",
            },
            description: v.meta.description.clone(),
            waits_on: v.inputs.iter().map(|x| x.0).collect(),
            line: v.meta.span.map(|s| s.start_line),
        })
        .collect();
    let mut stages = Vec::new();
    for s in &graph.stages {
        let name = stage_name(s);
        let mut deps = BTreeSet::new();
        for v in graph
            .vertices
            .iter()
            .filter(|v| v.meta.stage.as_deref() == Some(name.as_str()))
        {
            for input in &v.inputs {
                if let Some(other) = &graph.vertex(*input).meta.stage {
                    if *other != name {
                        deps.insert(other.clone());
                    }
                }
            }
        }
        // A stage whose FROM is another stage starts from that stage's last step.
        stages.push(PlanStage {
            name,
            depends_on: deps.into_iter().collect(),
        });
    }
    let mut order: Vec<&PlanStage> = stages.iter().collect();
    order.sort_by_key(|p| {
        graph
            .stages
            .iter()
            .find(|s| stage_name(s) == p.name)
            .map(|s| s.index)
    });
    let stages = order.into_iter().cloned().collect();
    Plan {
        target: stage_name(graph.target_stage()),
        stages,
        steps,
    }
}

impl Plan {
    /// The text form: one line per step, `#id [stage n/m] INSTRUCTION  <- #a #b`.
    pub fn to_text(&self) -> String {
        let mut out = format!("target: {}\nstages:\n", self.target);
        for s in &self.stages {
            if s.depends_on.is_empty() {
                out.push_str(&format!("  {}\n", s.name));
            } else {
                out.push_str(&format!("  {} <- {}\n", s.name, s.depends_on.join(", ")));
            }
        }
        out.push_str("steps:\n");
        for s in &self.steps {
            out.push_str(&format!("  #{} {}", s.id, s.description));
            if !s.waits_on.is_empty() {
                let w: Vec<String> = s.waits_on.iter().map(|x| format!("#{x}")).collect();
                out.push_str(&format!("  (waits on {})", w.join(" ")));
            }
            out.push('\n');
        }
        out
    }
}
