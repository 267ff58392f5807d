//! The build graph: plain data the solver runs. Vertices are stored in topological order
//! (every input has a smaller index). An op refers to its inputs by position in
//! [`Vertex::inputs`], so [`Vertex::canonical_op`] does not depend on where a vertex sits in
//! the graph: a cache key is `sha256(canonical_op ‖ input keys)`.

use serde::{Deserialize, Serialize};

use crate::platform::Platform;

/// The step modes are defined once, by the parser's typed instructions, and stored in the
/// ops as they are: their serde spelling is part of the cache key.
pub use kiln_dockerfile::instructions::{CacheSharing, NetworkMode, SecurityMode};

/// A stage's image config is the OCI image config itself: the frontend starts from the base
/// image's (or an empty one) and edits its runtime part and history.
pub use kiln_oci::ImageConfig;

/// Index of a vertex in [`BuildGraph::vertices`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VertexId(pub u32);

impl VertexId {
    /// The index into [`BuildGraph::vertices`].
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Position of an input in [`Vertex::inputs`].
pub type InputIndex = u32;

/// A source span in the Dockerfile (1-based lines and columns, end inclusive line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SourceSpan {
    /// First line.
    pub start_line: u32,
    /// Column on the first line.
    pub start_col: u32,
    /// Last line.
    pub end_line: u32,
}

/// One step of the build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vertex {
    /// What to do; the only part (with the inputs' keys) that feeds the cache key.
    pub op: Op,
    /// The vertices whose results this one consumes, referenced by position from `op`.
    pub inputs: Vec<VertexId>,
    /// Display and error-reporting data; never part of the cache key.
    pub meta: VertexMeta,
}

impl Vertex {
    /// Deterministic bytes of the op (JSON over ordered maps), for hashing.
    pub fn canonical_op(&self) -> Vec<u8> {
        // Serialising plain structs, Vecs, Strings and BTreeMaps cannot fail.
        serde_json::to_vec(&self.op).unwrap_or_default()
    }
}

/// Human-facing data about a vertex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VertexMeta {
    /// e.g. `[app 3/7] RUN composer install`.
    pub description: String,
    /// Name of the stage (or `stage-N` for an unnamed one); `None` for shared sources.
    pub stage: Option<String>,
    /// The instruction it came from.
    pub span: Option<SourceSpan>,
    /// Skip the cache for this vertex (`--no-cache`, `--no-cache-filter`).
    pub ignore_cache: bool,
}

/// The operation of a vertex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "op")]
pub enum Op {
    /// An image's root filesystem from a registry.
    Image(ImageSource),
    /// Files from a local directory sent by the client.
    Local(LocalSource),
    /// A file downloaded from a URL (ADD https://...).
    Http(HttpSource),
    /// An image in an OCI layout directory.
    OciLayout(OciLayoutSource),
    /// Run a process.
    Exec(ExecOp),
    /// Copy files (COPY, ADD).
    Copy(CopyOp),
    /// Create a directory (WORKDIR).
    Mkdir(MkdirOp),
    /// Stack the layers of its inputs in order, running nothing: `COPY --link` puts the layer
    /// it made on its own onto the stage's filesystem, so a changed base never reruns it.
    Merge(MergeOp),
}

impl Op {
    /// For a step that adds one layer on a filesystem (RUN, COPY/ADD, WORKDIR): the input
    /// it builds on, with `Some(None)` when it starts from an empty one. `None` for every
    /// other op.
    pub fn layer_base(&self) -> Option<Option<InputIndex>> {
        match self {
            Op::Exec(e) => Some(e.rootfs),
            Op::Copy(c) => Some(c.dest_base),
            Op::Mkdir(m) => Some(m.rootfs),
            _ => None,
        }
    }
}

/// `FROM image`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSource {
    /// Normalised reference, e.g. `docker.io/library/busybox:latest`.
    pub reference: String,
    /// Platform to pull.
    #[serde(with = "crate::platform::key_form")]
    pub platform: Platform,
    /// Manifest digest when the resolver knew it.
    pub digest: Option<String>,
}

/// A local directory (`context` or a named context / `--local`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalSource {
    /// Name the client knows the directory by (`context`, or a named context's name).
    pub name: String,
    /// Patterns to include (empty: everything).
    pub include: Vec<String>,
    /// Patterns to exclude (`.dockerignore`, in file order; `!` re-includes).
    pub exclude: Vec<String>,
}

/// `ADD <url>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpSource {
    /// The URL.
    pub url: String,
    /// Expected digest (`--checksum`).
    pub checksum: Option<String>,
    /// File name to save as (derived from the URL).
    pub filename: String,
}

/// `oci-layout://` named context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciLayoutSource {
    /// Layout directory on the client.
    pub path: String,
    /// Tag or digest inside it.
    pub reference: String,
    /// Platform to select.
    #[serde(with = "crate::platform::key_form")]
    pub platform: Platform,
}

/// `RUN`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOp {
    /// Root filesystem input; `None` = empty (FROM scratch).
    pub rootfs: Option<InputIndex>,
    /// argv (shell form already wrapped with the stage's SHELL).
    pub args: Vec<String>,
    /// Environment `K=V`, in the order BuildKit passes it (image env, then build args).
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// User (`name`, `uid`, `uid:gid`...); empty = root.
    pub user: String,
    /// Network mode.
    pub network: NetworkMode,
    /// Security mode.
    pub security: SecurityMode,
    /// Extra mounts, in the order given.
    pub mounts: Vec<Mount>,
    /// `--add-host` entries for the step's `/etc/hosts`. Left out of the op's bytes when
    /// empty, so keys of builds without them stay as they were.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_hosts: Vec<crate::run_settings::ExtraHost>,
    /// `--shm-size`: the size of the step's `/dev/shm` in bytes; `None` is the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<u64>,
    /// `--ulimit` limits of the step's processes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ulimits: Vec<crate::run_settings::Ulimit>,
}

/// One `RUN --mount`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Where it appears in the container.
    pub target: String,
    /// Kind and its options.
    pub kind: MountKind,
}

/// Kind-specific mount options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum MountKind {
    /// A read-only (or throwaway-writable) view of another vertex's result.
    Bind {
        /// Input providing the files.
        input: InputIndex,
        /// Sub-path inside the input.
        source: String,
        /// Read-only (the default); with `rw` writes are allowed and discarded afterwards.
        readonly: bool,
    },
    /// A persistent cache directory.
    Cache {
        /// Cache id (defaults to the target path).
        id: String,
        /// Sharing mode.
        sharing: CacheSharing,
        /// Initial content from an input, if `from=` was given.
        input: Option<InputIndex>,
        /// Sub-path of that input.
        source: String,
        /// Read-only.
        readonly: bool,
        /// Owner uid of the directory.
        uid: u32,
        /// Owner gid.
        gid: u32,
        /// Mode bits.
        mode: u32,
    },
    /// A tmpfs.
    Tmpfs {
        /// Size limit in bytes (0 = default).
        size: u64,
    },
    /// A secret file or environment variable.
    Secret {
        /// Secret id.
        id: String,
        /// Exposed as this env var instead of (or in addition to) a file.
        env: Option<String>,
        /// Fail when the secret was not provided.
        required: bool,
        /// Owner uid.
        uid: u32,
        /// Owner gid.
        gid: u32,
        /// Mode bits.
        mode: u32,
    },
    /// An SSH agent socket.
    Ssh {
        /// Agent id.
        id: String,
        /// Fail when the agent was not provided.
        required: bool,
        /// Owner uid.
        uid: u32,
        /// Owner gid.
        gid: u32,
        /// Mode bits.
        mode: u32,
    },
}

/// Ownership as given in `--chown`/`USER`: names are resolved against the rootfs at run time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chown {
    /// User name or uid.
    pub user: String,
    /// Group name or gid.
    pub group: Option<String>,
}

/// One inline file (a `COPY <<EOF` heredoc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InlineFile {
    /// File name (the heredoc word).
    pub name: String,
    /// Contents.
    pub content: String,
}

/// What a copy reads from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum CopySource {
    /// Files of an input vertex (context, stage, image, URL download).
    Input {
        /// Which input.
        input: InputIndex,
    },
    /// Heredoc files.
    Inline {
        /// The files.
        files: Vec<InlineFile>,
    },
}

/// `COPY` / `ADD`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyOp {
    /// Destination filesystem; `None` = empty (FROM scratch or `--link`).
    pub dest_base: Option<InputIndex>,
    /// Source of the files.
    pub source: CopySource,
    /// Source paths/patterns relative to the source root.
    pub srcs: Vec<String>,
    /// Destination (absolute, after resolving against the workdir).
    pub dest: String,
    /// Destination names a directory (ends with `/` or several sources).
    pub dest_is_dir: bool,
    /// `--chown`.
    pub chown: Option<Chown>,
    /// `--chmod` (octal or symbolic, as given).
    pub chmod: Option<String>,
    /// `--link`: the copy is a layer independent of the destination.
    pub link: bool,
    /// `--parents`: keep source parent directories.
    pub parents: bool,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
    /// ADD: extract local tar archives.
    pub auto_extract: bool,
    /// ADD of a git repository: keep `.git`.
    pub keep_git_dir: bool,
    /// ADD: the instruction was ADD (affects permissions of URL downloads).
    pub is_add: bool,
}

/// The layers of every input, the first input's at the bottom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MergeOp {}

/// `WORKDIR` (creates the directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MkdirOp {
    /// Filesystem to create it in; `None` = empty.
    pub rootfs: Option<InputIndex>,
    /// Absolute path.
    pub path: String,
    /// Mode bits.
    pub mode: u32,
    /// Owner (the stage's USER at that point, as BuildKit does).
    pub owner: Option<Chown>,
}

/// One stage of the build as lowered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageResult {
    /// Index of the stage in the Dockerfile.
    pub index: usize,
    /// Name (`AS name`), lower-cased, or `None`.
    pub name: Option<String>,
    /// The vertex holding the stage's final root filesystem (`None` for `FROM scratch` with no steps).
    pub root: Option<VertexId>,
    /// The image config at the end of the stage.
    pub config: ImageConfig,
    /// The platform the stage builds for.
    #[serde(with = "crate::platform::key_form")]
    pub platform: Platform,
}

/// The lowered build: vertices in topological order and the stages needed for the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildGraph {
    /// All vertices; inputs always precede their users.
    pub vertices: Vec<Vertex>,
    /// Stages the target needs, in Dockerfile order (the target last).
    pub stages: Vec<StageResult>,
    /// Index into `stages` of the target stage (always the last element).
    pub target: usize,
}

impl BuildGraph {
    /// The target stage.
    pub fn target_stage(&self) -> &StageResult {
        &self.stages[self.target]
    }

    /// The vertex with this id.
    pub fn vertex(&self, id: VertexId) -> &Vertex {
        &self.vertices[id.index()]
    }
}
