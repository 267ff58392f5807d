//! Instructions that edit the image config (ENV, LABEL, USER, STOPSIGNAL, EXPOSE, VOLUME,
//! CMD, ENTRYPOINT, SHELL, ONBUILD, MAINTAINER, HEALTHCHECK) and WORKDIR.

use kiln_dockerfile::instructions as ins;

use kiln_oci::config::EmptyObject;
use kiln_oci::HealthConfig;

use super::*;

impl<'a> Lowerer<'a> {
    /// Lowers an instruction that edits only the image config (ENV, LABEL, USER, CMD, ...),
    /// or WORKDIR, which also creates its directory.
    pub(super) fn lower_config(
        &mut self,
        st: &mut StageState,
        inst: &Instruction,
        typed: &Typed,
        kind: Keyword,
        at: Option<Span>,
    ) -> Result<(), FrontendError> {
        let span = at.unwrap_or(inst.span);
        match kind {
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
                    st.config
                        .runtime_mut()
                        .labels
                        .get_or_insert_default()
                        .insert(k, v);
                }
                Self::history(st, format!("LABEL {text}"), true);
                Ok(())
            }
            Keyword::Workdir => {
                let raw = text_arg(inst).ok_or_else(|| {
                    FrontendError::new("WORKDIR requires exactly one argument", span)
                })?;
                let v = self.expand(&raw, span, &|n| st.lookup(n))?;
                let path = resolve_path(st.config.runtime().working_dir(), &v);
                st.config.runtime_mut().working_dir = Some(path.clone());
                let meta = self.step_meta(st, inst, at);
                let user = st.config.runtime().user();
                let owner = (!user.is_empty()).then(|| parse_chown(user));
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
                let user = self.expand(&raw, span, &|n| st.lookup(n))?;
                Self::history(st, format!("USER {user}"), true);
                st.config.runtime_mut().user = Some(user);
                Ok(())
            }
            Keyword::Stopsignal => {
                let raw = text_arg(inst).ok_or_else(|| {
                    FrontendError::new("STOPSIGNAL requires exactly one argument", span)
                })?;
                let v = self.expand(&raw, span, &|n| st.lookup(n))?;
                Self::history(st, format!("STOPSIGNAL {v}"), true);
                st.config.runtime_mut().stop_signal = Some(v);
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
                st.config
                    .runtime_mut()
                    .exposed_ports
                    .get_or_insert_default()
                    .extend(ports.into_iter().map(|p| (p, EmptyObject {})));
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
                st.config
                    .runtime_mut()
                    .volumes
                    .get_or_insert_default()
                    .extend(vols.into_iter().map(|v| (v, EmptyObject {})));
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
                    st.config.runtime_mut().cmd = Some(v);
                    st.cmd_set = true;
                } else {
                    Self::history(st, format!("ENTRYPOINT {shown}"), true);
                    let runtime = st.config.runtime_mut();
                    runtime.entrypoint = Some(v);
                    if !st.cmd_set {
                        runtime.cmd = None;
                    }
                }
                Ok(())
            }
            Keyword::Shell => match &inst.args {
                Args::Json(j) if !j.values.is_empty() => {
                    st.config.runtime_mut().shell = Some(j.values.clone());
                    Self::history(st, format!("SHELL {:?}", j.values), true);
                    Ok(())
                }
                _ => Err(FrontendError::new(
                    "SHELL requires the arguments to be in JSON form",
                    span,
                )),
            },
            Keyword::Healthcheck => self.lower_healthcheck(st, inst, typed, span),
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
                st.config
                    .runtime_mut()
                    .on_build
                    .get_or_insert_default()
                    .push(trigger);
                Ok(())
            }
            Keyword::Maintainer => {
                let v = text_arg(inst).unwrap_or_default();
                Self::history(st, format!("MAINTAINER {v}"), true);
                Ok(())
            }
            _ => Err(FrontendError::new(
                format!(
                    "{} is not a config instruction (internal error)",
                    inst.name()
                ),
                span,
            )),
        }
    }

    pub(super) fn lower_healthcheck(
        &mut self,
        st: &mut StageState,
        inst: &Instruction,
        typed: &Typed,
        span: Span,
    ) -> Result<(), FrontendError> {
        let Args::Healthcheck { kind, command } = &inst.args else {
            return Err(FrontendError::new("HEALTHCHECK requires an argument", span));
        };
        let mut hc = HealthConfig::default();
        match kind.text.to_ascii_uppercase().as_str() {
            "NONE" => {
                if !matches!(**command, Args::Empty) {
                    return Err(FrontendError::new(
                        "HEALTHCHECK NONE takes no arguments",
                        span,
                    ));
                }
                // A flag here is a mistake the typed layer reports.
                if let Err(e) = typed {
                    if e.flag.is_some() {
                        return Err(word_parse_error(e, inst));
                    }
                }
                hc.test = Some(vec!["NONE".into()]);
            }
            "CMD" => {
                hc.test = Some(match &**command {
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
                });
                // Durations and retries are read as written; the typed layer parsed them.
                let t = typed.as_ref().map_err(|e| word_parse_error(e, inst))?;
                let Command::Healthcheck(ins::Healthcheck::Cmd {
                    interval,
                    timeout,
                    start_period,
                    start_interval,
                    retries,
                    ..
                }) = &t.command
                else {
                    return Err(typed_mismatch(inst));
                };
                // 0 (or no flag) means the default, which the config leaves out.
                let nanos = |d: Option<std::time::Duration>| {
                    d.map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
                        .filter(|n| *n > 0)
                };
                hc.interval = nanos(*interval);
                hc.timeout = nanos(*timeout);
                hc.start_period = nanos(*start_period);
                hc.start_interval = nanos(*start_interval);
                if let Some(n) = retries {
                    let retries = u32::try_from(*n).map_err(|_| {
                        FrontendError::new(
                            format!("--retries: \"{n}\" is not a whole number"),
                            t.flag("retries").map_or(span, |f| f.span),
                        )
                    })?;
                    hc.retries = (retries > 0).then_some(i64::from(retries));
                }
            }
            other => {
                return Err(FrontendError::new(
                    format!("unknown type {other:?} in HEALTHCHECK (try CMD)"),
                    kind.span,
                ))
            }
        }
        Self::history(
            st,
            format!("HEALTHCHECK {:?}", hc.test.as_deref().unwrap_or_default()),
            true,
        );
        st.config.runtime_mut().healthcheck = Some(hc);
        Ok(())
    }
}

pub(super) fn key_values(inst: &Instruction) -> Result<Vec<(String, String, Span)>, FrontendError> {
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

pub(super) fn text_arg(inst: &Instruction) -> Option<String> {
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

pub(super) fn words_of(inst: &Instruction) -> Vec<String> {
    match &inst.args {
        Args::Words(w) => w.iter().map(|w| w.text.clone()).collect(),
        Args::Text(w) => vec![w.text.clone()],
        Args::Json(j) => j.values.clone(),
        _ => Vec::new(),
    }
}

/// CMD/ENTRYPOINT args and whether the stage's SHELL must be prepended (shell form).
pub(super) fn command_args(inst: &Instruction) -> (Vec<String>, bool) {
    match &inst.args {
        Args::Json(j) => (j.values.clone(), false),
        Args::Text(w) => (vec![w.text.clone()], true),
        _ => (Vec::new(), false),
    }
}

pub(super) fn parse_chown(s: &str) -> Chown {
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

pub(super) fn expose_ports(p: &str) -> Result<Vec<String>, String> {
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
