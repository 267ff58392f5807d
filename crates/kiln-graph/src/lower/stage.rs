//! FROM: the stage's base (an earlier stage, a named context, `scratch` or an image), the
//! ONBUILD triggers it brings, and the sources `COPY --from` / `RUN --mount=from=` name.

use super::*;

/// `PATH` BuildKit gives Linux stages whose image sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl<'a> Lowerer<'a> {
    /// The last stage named `lower` (lowercase) defined before stage `idx`.
    pub(super) fn earlier_stage_named(&self, lower: &str, idx: usize) -> Option<usize> {
        self.stages[..idx.min(self.stages.len())]
            .iter()
            .rev()
            .find(|s| s.name.as_deref() == Some(lower))
            .map(|s| s.index)
    }

    pub(super) fn lower_stage_body(&mut self, idx: usize) -> Result<StageResult, FrontendError> {
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
        let triggers = config
            .config
            .as_mut()
            .and_then(|c| c.on_build.take())
            .unwrap_or_default();
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
            env: ContainerConfig {
                env: Some(config.runtime().env().to_vec()),
                ..ContainerConfig::default()
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
            let typed = kiln_dockerfile::instructions::lower(inst);
            self.lower_instruction(&mut st, inst, &typed, Some(from_span))?;
        }
        for (inst, typed) in decl.instructions.iter().zip(&decl.typed) {
            self.lower_instruction(&mut st, inst, typed, None)?;
        }
        Ok(StageResult {
            index: idx,
            name: decl.name.clone(),
            root: st.root,
            config: st.config,
            platform,
        })
    }

    pub(super) fn named_context_source(
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

    pub(super) fn context(&mut self) -> VertexId {
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
    pub(super) fn stage_or_image_source(
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
}
