//! Build-graph types, and the frontend that lowers a Dockerfile AST plus build options into
//! a graph of vertices (image source, local context, exec, file copy, image-config edits).
//!
//! No filesystem or network access happens here: base-image configs come through
//! [`ImageConfigResolver`], the `.dockerignore` text and the Dockerfile text through arguments.

pub mod graph;
pub mod options;
pub mod platform;

pub use graph::{BuildGraph, ImageConfig, Op, Vertex, VertexId};
pub use options::{BuildOptions, OptionError, RawBuildFlags};
pub use platform::Platform;
pub mod error;
pub mod frontend;
pub mod reference;
pub mod resolver;
mod stages;

pub use error::FrontendError;
pub use frontend::{lower, lower_with_outline, ArgInfo, Outline, SecretInfo};
pub use resolver::{ImageConfigResolver, OfflineResolver, ResolveError, ResolvedImage};
pub use stages::{targets, TargetInfo};
pub mod plan;
pub use plan::{plan, Plan};
