//! Instructions that edit the image config (ENV, LABEL, USER, STOPSIGNAL, EXPOSE, VOLUME,
//! CMD, ENTRYPOINT, SHELL, ONBUILD, MAINTAINER, HEALTHCHECK) and WORKDIR.

use super::*;

impl<'a> Lowerer<'a> {
    /// Lowers an instruction that edits only the image config (ENV, LABEL, USER, CMD, ...),
    /// or WORKDIR, which also creates its directory.
    pub(super) fn lower_config(
        &mut self,
        st: &mut StageState,
        inst: &Instruction,
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
                    // HEALTHCHECK durations and retries are read as written.
                    let v = self.flag_value(Keyword::Healthcheck, f, &|_: &str| None)?;
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

/// Go duration (`1m30s`, `500ms`, `2h`) in nanoseconds.
pub(super) fn parse_duration(s: &str) -> Option<u64> {
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
