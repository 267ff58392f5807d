//! One module per command group; each exposes its clap `Args` and a `run` function.

pub mod build;
pub mod debug;
pub mod registry;
