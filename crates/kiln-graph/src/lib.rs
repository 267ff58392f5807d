//! Build-graph types, and the frontend that lowers a Dockerfile AST plus build options into
//! a graph of vertices (image source, local context, exec, file copy, image-config edits).
//!
//! No filesystem or network access happens here: base-image configs come through
//! [`ImageConfigResolver`], the `.dockerignore` patterns and the parsed Dockerfile through
//! arguments. `docs/frontend.md` describes the types and the scoping rules.

#![warn(missing_docs)]

pub mod error;
pub mod graph;
mod lower;
pub mod options;
pub mod plan;
pub mod platform;
pub mod reference;
pub mod resolver;
pub mod run_settings;
mod stages;

pub use error::FrontendError;
pub use graph::{BuildGraph, ImageConfig, Op, Vertex, VertexId};
pub use lower::{lower, lower_with_outline, ArgInfo, Outline, SecretInfo};
pub use options::{BuildOptions, OptionError, RawBuildFlags};
pub use plan::{plan, Plan};
pub use platform::Platform;
pub use resolver::{ImageConfigResolver, OfflineResolver, ResolveError, ResolvedConfig};
pub use stages::{targets, TargetInfo};
