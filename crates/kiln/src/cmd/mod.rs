//! One module per command group; each exposes its clap `Args` and a `run` function.

pub mod build;
pub mod build_cache;
pub mod build_call;
pub mod build_exec;
pub mod debug;
pub mod history;
pub mod import;
pub mod login;
pub mod registry;
pub mod state;
