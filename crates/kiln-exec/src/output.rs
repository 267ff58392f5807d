//! Supervising a started container: streaming its output line by line, waiting for it, and
//! killing it on cancellation.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant, SystemTime};

use crate::spec::{CancelToken, ExecError, OutputLine, OutputSink, OutputStream};

/// Lines longer than this are passed on in pieces.
const MAX_LINE: usize = 64 * 1024;
/// Secrets shorter than this are not searched for in output (too many false hits).
const MIN_SECRET_LEN: usize = 4;

/// Creates a pipe whose both ends are close-on-exec: (read, write).
pub(crate) fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd), ExecError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds has room for two descriptors.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if r != 0 {
        return Err(ExecError::Spawn {
            what: "creating a pipe",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

struct LineBuffer {
    stream: OutputStream,
    buf: Vec<u8>,
    open: bool,
}

struct Redactor<'a> {
    patterns: Vec<&'a [u8]>,
}

impl<'a> Redactor<'a> {
    fn new(secrets: &'a [Vec<u8>]) -> Self {
        let mut patterns: Vec<&[u8]> = Vec::new();
        for s in secrets {
            let trimmed = s.trim_ascii();
            if trimmed.len() >= MIN_SECRET_LEN {
                patterns.push(trimmed);
            }
            // A multi-line secret printed whole reaches us one line at a time.
            for l in trimmed.split(|b| *b == b'\n') {
                let l = l.trim_ascii();
                if l.len() >= MIN_SECRET_LEN && l.len() != trimmed.len() {
                    patterns.push(l);
                }
            }
        }
        patterns.sort_by_key(|p| std::cmp::Reverse(p.len()));
        Redactor { patterns }
    }

    /// Returns the line with every secret replaced by `****`, or `None` if it had none.
    fn redact(&self, line: &[u8]) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        for p in &self.patterns {
            let cur = out.as_deref().unwrap_or(line);
            if let Some(replaced) = replace_all(cur, p) {
                out = Some(replaced);
            }
        }
        out
    }
}

fn replace_all(hay: &[u8], needle: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    let mut found = false;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(b"****");
            i += needle.len();
            found = true;
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    found.then_some(out)
}

fn emit(sink: &mut dyn OutputSink, redactor: &Redactor<'_>, stream: OutputStream, line: &[u8]) {
    let at = SystemTime::now();
    match redactor.redact(line) {
        Some(clean) => sink.line(OutputLine {
            stream,
            bytes: &clean,
            at,
            secret_redacted: true,
        }),
        None => sink.line(OutputLine {
            stream,
            bytes: line,
            at,
            secret_redacted: false,
        }),
    }
}

impl LineBuffer {
    fn push(&mut self, data: &[u8], sink: &mut dyn OutputSink, redactor: &Redactor<'_>) {
        self.buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|b| *b == b'\n') {
            let mut line = &self.buf[start..start + pos];
            while line.len() > MAX_LINE {
                emit(sink, redactor, self.stream, &line[..MAX_LINE]);
                line = &line[MAX_LINE..];
            }
            emit(sink, redactor, self.stream, line);
            start += pos + 1;
        }
        while self.buf.len() - start > MAX_LINE {
            emit(
                sink,
                redactor,
                self.stream,
                &self.buf[start..start + MAX_LINE],
            );
            start += MAX_LINE;
        }
        self.buf.drain(..start);
    }

    fn finish(&mut self, sink: &mut dyn OutputSink, redactor: &Redactor<'_>) {
        if !self.buf.is_empty() {
            emit(sink, redactor, self.stream, &self.buf);
            self.buf.clear();
        }
        self.open = false;
    }
}

/// How the supervised process ended.
pub(crate) struct Supervised {
    /// Raw `waitpid` status.
    pub wait_status: i32,
    /// True when the cancel token fired and the process was killed.
    pub cancelled: bool,
}

fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: plain syscall; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a non-negative fd is the new pidfd, owned by nothing else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Streams `stdout`/`stderr` to `sink` until both close and `pid` (our child) has exited and
/// been reaped. On cancellation calls `kill` (every 100 ms until the process is gone).
pub(crate) fn supervise(
    pid: libc::pid_t,
    stdout: OwnedFd,
    stderr: OwnedFd,
    sink: &mut dyn OutputSink,
    cancel: &CancelToken,
    secrets: &[Vec<u8>],
    kill: &mut dyn FnMut(),
) -> Result<Supervised, ExecError> {
    let redactor = Redactor::new(secrets);
    let pidfd = pidfd_open(pid);
    let mut bufs = [
        LineBuffer {
            stream: OutputStream::Stdout,
            buf: Vec::new(),
            open: true,
        },
        LineBuffer {
            stream: OutputStream::Stderr,
            buf: Vec::new(),
            open: true,
        },
    ];
    let fds = [stdout, stderr];
    let mut status: Option<i32> = None;
    let mut cancelled = false;
    let mut last_kill: Option<Instant> = None;
    let mut exited_at: Option<Instant> = None;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if status.is_some() && !bufs[0].open && !bufs[1].open {
            break;
        }
        if let Some(t) = exited_at {
            // Every writer lived in the container's pid namespace, which is gone; a pipe still
            // open after this long is held by something else, so stop waiting for it.
            if t.elapsed() > Duration::from_secs(10) {
                for b in bufs.iter_mut() {
                    if b.open {
                        b.finish(sink, &redactor);
                    }
                }
                break;
            }
        }
        let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(4);
        let mut roles: Vec<usize> = Vec::with_capacity(4);
        for (i, b) in bufs.iter().enumerate() {
            if b.open {
                pfds.push(libc::pollfd {
                    fd: fds[i].as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                roles.push(i);
            }
        }
        if status.is_none() {
            if let Some(p) = &pidfd {
                pfds.push(libc::pollfd {
                    fd: p.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                roles.push(2);
            }
        }
        let cancel_fd = if cancelled { None } else { cancel.wake_fd() };
        if let Some(fd) = cancel_fd {
            pfds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            roles.push(3);
        }
        let need_timer = (status.is_none() && pidfd.is_none())
            || (!cancelled && cancel_fd.is_none())
            || (cancelled && status.is_none());
        let timeout = if need_timer || exited_at.is_some() {
            50
        } else {
            -1
        };
        // SAFETY: pfds is a valid array of pollfd.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ExecError::Spawn {
                what: "polling container output",
                source: e,
            });
        }
        for (pfd, role) in pfds.iter().zip(roles.iter()) {
            if pfd.revents == 0 || *role > 1 {
                continue;
            }
            // SAFETY: reading into our own buffer from our pipe.
            let r = unsafe { libc::read(pfd.fd, chunk.as_mut_ptr().cast(), chunk.len()) };
            if r > 0 {
                bufs[*role].push(&chunk[..r as usize], sink, &redactor);
            } else if r == 0
                || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
            {
                bufs[*role].finish(sink, &redactor);
            }
        }
        if cancel.is_cancelled() && status.is_none() {
            // Repeated until the process is gone: a backend may not be able to kill yet
            // (runc before its container exists), so `kill` must be idempotent.
            let due = last_kill.is_none_or(|t: Instant| t.elapsed() >= Duration::from_millis(100));
            if due {
                kill();
                last_kill = Some(Instant::now());
            }
            cancelled = true;
        }
        if status.is_none() {
            let mut st = 0;
            // SAFETY: waiting for our own child without blocking.
            let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
            if r == pid {
                status = Some(st);
                exited_at = Some(Instant::now());
            } else if r < 0 {
                return Err(ExecError::Spawn {
                    what: "waiting for the container",
                    source: std::io::Error::last_os_error(),
                });
            }
        }
    }
    Ok(Supervised {
        wait_status: status.unwrap_or(0),
        cancelled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::CollectedOutput;

    #[test]
    fn secrets_are_replaced_in_lines_and_flagged() {
        let secrets = vec![b"hunter22\n".to_vec(), b"ab".to_vec()];
        let r = Redactor::new(&secrets);
        assert_eq!(r.redact(b"pw=hunter22!").unwrap(), b"pw=****!");
        assert!(r.redact(b"ab is too short to redact").is_none());
        let mut out = CollectedOutput::default();
        let mut b = LineBuffer {
            stream: OutputStream::Stdout,
            buf: Vec::new(),
            open: true,
        };
        b.push(b"one\ntwo hunter", &mut out, &r);
        b.push(b"22\npartial", &mut out, &r);
        b.finish(&mut out, &r);
        assert_eq!(out.stdout_text(), "one\ntwo ****\npartial");
        assert!(out.secret_redacted);
    }
}
