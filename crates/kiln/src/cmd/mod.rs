//! One module per command group; each exposes its clap `Args` and a `run` function.

/// `println!` for command output, through [`print_stdout`]: `kiln du | head` ends kiln by
/// SIGPIPE like other command-line tools instead of panicking with exit 101. Used in
/// functions returning `anyhow::Result`.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cmd::print_stdout(&format!("{}\n", format_args!($($arg)*)))?
    };
}

pub mod build;
pub mod build_call;
pub mod debug;
pub mod git_context;
pub mod history;
pub mod import;
pub mod login;
pub mod registry;
pub mod state;

/// Writes `text` to stdout. A reader that went away (`kiln build --dry-run=json | head`,
/// `kiln du | head`) ends kiln as it ends other command-line tools: by SIGPIPE, quietly,
/// instead of a panic. Every command's output goes through here.
pub(crate) fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            // SAFETY: restoring the default action of SIGPIPE and raising it only ends the
            // process; Rust's runtime set it to "ignore" at start-up.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
            std::process::exit(141)
        }
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}
