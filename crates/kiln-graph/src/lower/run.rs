//! RUN: the command (shell or exec form, heredocs), its environment, network and security
//! modes, and each `--mount` lowered to a graph mount.

use kiln_dockerfile::instructions::{self as typed, CommandLine};
use kiln_dockerfile::Heredoc;

use super::*;

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

impl<'a> Lowerer<'a> {
    /// Lowers RUN from its typed form `run` (the flags of `t`); `inst` gives the text shown
    /// in progress and history.
    pub(super) fn lower_run(
        &mut self,
        st: &mut StageState,
        inst: &Instruction,
        t: &TypedInstruction,
        run: &typed::Run,
        at: Option<Span>,
    ) -> Result<(), FrontendError> {
        // `--network`/`--opt force-network-mode` sets the mode of steps that name none.
        let mut network = self.opts.network;
        let mut security = SecurityMode::Sandbox;
        let mut mounts = Vec::new();
        let mut inputs: Vec<VertexId> = Vec::new();
        let (rootfs, root_inputs) = input_of(st.root);
        inputs.extend(root_inputs);
        // The flags are taken in the order they are written, so the first mistake is the
        // one reported. BuildKit reads `--network` and `--security` as written (the typed
        // layer has checked them); `--mount` values are expanded field by field.
        let mut typed_mounts = run.mounts.iter();
        for f in &t.flags {
            match f.name {
                "network" => {
                    if let Some(mode) = run.network {
                        if mode == NetworkMode::Host && !self.opts.entitlements.network_host {
                            return Err(FrontendError::new(
                                "RUN --network=host needs the network.host entitlement: the \
                                 host's network exposes every service on the runner's loopback \
                                 to this step; build with --allow network.host",
                                f.span,
                            ));
                        }
                        network = mode;
                    }
                }
                "security" => {
                    if let Some(mode) = run.security {
                        security = mode;
                    }
                }
                _ => {
                    if let Some(m) = typed_mounts.next() {
                        let m = self.lower_mount(st, &m.written, m.span, &mut inputs)?;
                        mounts.push(m);
                    }
                }
            }
        }
        let (args, shell_form) = match &run.command {
            CommandLine::Exec(argv) if argv.is_empty() => {
                return Err(FrontendError::new(
                    "RUN [] has no command: the exec form needs at least the program to run",
                    inst.span,
                ))
            }
            CommandLine::Exec(argv) => (argv.clone(), false),
            // A bare `RUN` (or one with only flags) runs an empty script with the stage's
            // shell, as BuildKit's parser and lowering make it.
            CommandLine::Shell(text) => {
                let cmd = run_script(text, &run.heredocs);
                let mut a = st.shell();
                a.push(cmd);
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
        let cwd = match st.config.runtime().working_dir() {
            "" => "/".to_string(),
            w => w.to_string(),
        };
        let meta = self.step_meta(st, inst, at);
        let op = ExecOp {
            rootfs,
            args: args.clone(),
            env,
            cwd,
            user: st.config.runtime().user().to_string(),
            network,
            security,
            mounts,
            extra_hosts: self.opts.extra_hosts.clone(),
            shm_size: self.opts.shm_size,
            ulimits: self.opts.ulimits.clone(),
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

    /// Lowers one `RUN --mount` value as written to a graph mount: the parser crate's
    /// [`kiln_dockerfile::instructions::parse_mount_expanding`] (kiln's one mount parser)
    /// reads it, expanding each field's value on its own; this adds BuildKit's defaults per
    /// type, resolves the target against the WORKDIR and `from=` to a vertex.
    pub(super) fn lower_mount(
        &mut self,
        st: &StageState,
        v: &str,
        span: Span,
        inputs: &mut Vec<VertexId>,
    ) -> Result<Mount, FrontendError> {
        use kiln_dockerfile::instructions::{self as ins, MountType};
        let err = |m: String| FrontendError::new(mount_error_message(v, &m), span);
        let mut expand_failure = None;
        let parsed = {
            let lookup = |n: &str| st.lookup(n);
            ins::parse_mount_expanding(v, &mut |word| match self.expand(word, span, &lookup) {
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
            (Err(e), None) => return Err(err(e)),
        };
        // `from=` that expands to nothing means the build context, as in BuildKit.
        if m.from.as_deref() == Some("") {
            m.from = None;
        }
        let mut from_input =
            |s: &mut Self, from: Option<&str>| -> Result<Option<InputIndex>, FrontendError> {
                let Some(from) = from else { return Ok(None) };
                match s.stage_or_image_source(st, from, span)? {
                    Some(id) => {
                        inputs.push(id);
                        Ok(Some((inputs.len() - 1) as InputIndex))
                    }
                    None => Ok(None),
                }
            };
        let abs = |t: &str| resolve_path(st.config.runtime().working_dir(), t);
        // Bind, cache and tmpfs mounts without `target=` go to the WORKDIR and a relative
        // target is joined to it (BuildKit's rule); only a mount over `/` itself is refused.
        // Secret and SSH mounts keep their own default paths.
        if matches!(
            m.kind,
            MountType::Bind | MountType::Cache | MountType::Tmpfs
        ) {
            let resolved = abs(m.target.as_deref().unwrap_or(""));
            if resolved.trim_end_matches('/').is_empty() {
                let workdir = match st.config.runtime().working_dir() {
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
                    sharing: m.sharing.unwrap_or(CacheSharing::Shared),
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
                        line: span.start.line,
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
                        line: span.start.line,
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
}

/// The script a shell-form RUN hands to the shell: a lone heredoc runs as the script itself;
/// otherwise heredoc bodies follow the command line as the shell expects them.
pub(super) fn run_script(cmd: &str, heredocs: &[Heredoc]) -> String {
    if heredocs.is_empty() {
        return cmd.to_string();
    }
    let t = cmd.trim();
    if heredocs.len() == 1 && t.starts_with("<<") && !t.contains(char::is_whitespace) {
        return heredocs[0].body();
    }
    let mut s = cmd.to_string();
    for h in heredocs {
        s.push('\n');
        s.push_str(&h.content);
        s.push_str(&h.name);
    }
    s
}
