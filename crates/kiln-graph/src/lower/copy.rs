//! COPY and ADD: sources from the context, a stage, an image, heredocs or URLs, with
//! `--chown`, `--chmod`, `--link`, `--parents`, `--exclude`, `--checksum`.

use kiln_dockerfile::instructions::AddCopy;

use super::config::parse_chown;
use super::*;

impl<'a> Lowerer<'a> {
    /// Lowers COPY or ADD from its typed form `c` (the flags of `t`); the sources and the
    /// destination are read from `inst`, each expanded where it is written.
    pub(super) fn lower_copy(
        &mut self,
        st: &mut StageState,
        inst: &Instruction,
        t: &TypedInstruction,
        c: &AddCopy,
        at: Option<Span>,
        is_add: bool,
    ) -> Result<(), FrontendError> {
        let name = inst.name();
        let lookup = |n: &str| st.lookup(n);
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
        let dest = resolve_path(st.config.runtime().working_dir(), &dest_raw);
        // An empty destination (`COPY a $UNSET`) is the WORKDIR, a directory. Several
        // sources do not make one: BuildKit copies each onto a path without `/`.
        let dest_is_dir = dest_raw.ends_with('/')
            || dest_raw.ends_with("/.")
            || dest_raw == "."
            || dest_raw.is_empty();
        // `--chown`, `--chmod`, `--checksum` and what remains of `--from` (the typed layer
        // refuses a variable in it) are expanded; the booleans and `--exclude` patterns are
        // taken as written (BuildKit does not expand `--exclude`, see moby/buildkit#6072).
        let chown = self
            .expand_flag(t, "chown", c.chown.as_ref(), &lookup)?
            .filter(|s| !s.is_empty())
            .map(|s| parse_chown(&s));
        let chmod = self
            .expand_flag(t, "chmod", c.chmod.as_ref(), &lookup)?
            .filter(|s| !s.is_empty());
        if let Some(m) = &chmod {
            let octal = m.len() <= 4 && m.chars().all(|c| ('0'..='7').contains(&c));
            let symbolic = m.chars().all(|c| "ugoa+-=rwxXst,".contains(c));
            if !octal && !symbolic {
                let f = t.flag("chmod").map_or(inst.span, |f| f.span);
                return Err(FrontendError::new(
                    format!(
                        "invalid chmod value {m:?}: expected octal like 0755 or symbolic like u+x"
                    ),
                    f,
                ));
            }
        }
        let (link, parents, keep_git_dir) = (c.link, c.parents, c.keep_git_dir);
        let checksum = self.expand_flag(t, "checksum", c.checksum.as_ref(), &lookup)?;
        let exclude = c.exclude.clone();
        let from_span = t.flag("from").map_or(inst.span, |f| f.span);
        let from = self
            .expand_flag(t, "from", c.from.as_ref(), &lookup)?
            .map(|v| (v, from_span));

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
        // History shows these flags as written, as BuildKit does.
        let mut created = name.clone();
        for f in t
            .flags
            .iter()
            .filter(|f| matches!(f.name, "from" | "chown" | "chmod" | "link"))
        {
            created.push(' ');
            created.push_str(&f.text);
        }
        Self::history(st, format!("{created} {shown} # buildkit"), false);
        Ok(())
    }
}

/// The file name `ADD <url>` saves as: the last segment of the URL's path, percent-decoded
/// (trailing slashes ignored), or `__unnamed__` when the path has none, as BuildKit names it.
pub(super) fn url_file_name(url: &str) -> String {
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
