//! ARG: global ARGs (before the first FROM, seen by FROM lines) and stage ARGs (build arg,
//! else default, else the global value), and what `--call outline` lists.

use super::*;

impl<'a> Lowerer<'a> {
    pub(super) fn eval_globals(
        &mut self,
        globals: &[&'a Instruction],
    ) -> Result<(), FrontendError> {
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

    pub(super) fn note_arg(&mut self, info: ArgInfo) {
        if !self.outline_args.iter().any(|a| a.name == info.name) {
            self.outline_args.push(info);
        }
    }

    pub(super) fn lower_arg(
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
}

/// `ARG a b=1 "c=x y"` → declarations (name, default) as written.
pub(super) fn arg_decls(
    inst: &Instruction,
) -> Result<Vec<(String, Option<String>, Span)>, FrontendError> {
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
