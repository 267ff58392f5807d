//! The live terminal view of `--progress tty`, in BuildKit's shape:
//!
//! ```text
//! [+] Building 3.4s (5/7)
//!  => CACHED [base 1/3] FROM docker.io/library/busybox:latest
//!  => [app 2/4] COPY src/ ./src/                                  DONE 0.1s
//!  => [app 3/4] RUN make                                               2.1s
//!  => => # cc -c main.c
//!  => [deps 2/2] RUN npm ci                                            1.8s
//! ```
//!
//! A thread redraws the view about ten times a second: it moves the cursor up over the
//! lines it drew last time and writes the new ones in place (each line erased to its end,
//! never the whole screen first, so nothing flickers). Every drawn line is cut to the
//! terminal's width, and the redrawn part never exceeds its height: when it would, finished
//! steps are written out for good above the redrawn part and then left alone. While the view
//! runs, the process's stderr (fd 2) is a pipe the thread reads: a warning printed by any
//! code lands above the view as a whole line instead of cutting through it.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Lines of a running step's output shown under it.
const LOG_TAIL: usize = 6;
/// Time between two redraws.
const TICK: Duration = Duration::from_millis(100);

/// Where one step is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum StepState {
    Running(Instant),
    Done(Duration),
    Cached,
    Failed(Duration),
}

#[derive(Debug)]
struct StepRow {
    node: usize,
    name: String,
    state: StepState,
    logs: VecDeque<String>,
    /// Written out above the redrawn part; never drawn again.
    committed: bool,
}

/// What the live view shows: the steps in the order they appeared, and lines other code
/// wrote to stderr that are still to be printed.
#[derive(Debug)]
pub(crate) struct Board {
    begun: Instant,
    rows: Vec<StepRow>,
    messages: Vec<String>,
    color: bool,
}

/// One redraw: lines printed for good (they scroll away) and the lines redrawn next time.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Frame {
    pub(crate) committed: Vec<String>,
    pub(crate) live: Vec<String>,
}

impl Board {
    pub(crate) fn new(begun: Instant, color: bool) -> Self {
        Board {
            begun,
            rows: Vec::new(),
            messages: Vec::new(),
            color,
        }
    }

    fn row(&mut self, node: usize, name: &str) -> &mut StepRow {
        let i = match self.rows.iter().position(|r| r.node == node) {
            Some(i) => i,
            None => {
                self.rows.push(StepRow {
                    node,
                    name: name.to_owned(),
                    state: StepState::Cached,
                    logs: VecDeque::new(),
                    committed: false,
                });
                self.rows.len() - 1
            }
        };
        &mut self.rows[i]
    }

    pub(crate) fn started(&mut self, node: usize, name: &str) {
        self.row(node, name).state = StepState::Running(Instant::now());
    }

    pub(crate) fn cached(&mut self, node: usize, name: &str) {
        self.row(node, name).state = StepState::Cached;
    }

    pub(crate) fn completed(&mut self, node: usize, name: &str, took: Duration) {
        let r = self.row(node, name);
        r.state = StepState::Done(took);
        r.logs.clear();
    }

    pub(crate) fn failed(&mut self, node: usize, name: &str) {
        let r = self.row(node, name);
        let took = match r.state {
            StepState::Running(t) => t.elapsed(),
            _ => Duration::ZERO,
        };
        r.state = StepState::Failed(took);
    }

    pub(crate) fn log(&mut self, node: usize, name: &str, line: &[u8]) {
        let text = printable(&String::from_utf8_lossy(line));
        let r = self.row(node, name);
        r.logs.push_back(text);
        while r.logs.len() > LOG_TAIL {
            r.logs.pop_front();
        }
    }

    /// A line another part of kiln wrote to stderr.
    pub(crate) fn message(&mut self, line: String) {
        self.messages.push(line);
    }

    fn paint(&self, sgr: &str, text: String) -> String {
        if self.color {
            format!("\x1b[{sgr}m{text}\x1b[0m")
        } else {
            text
        }
    }

    /// One step's line (cut to `width`), and its log tail when it runs or failed.
    fn step_lines(&self, r: &StepRow, width: usize, logs: usize, last: bool) -> Vec<String> {
        let (prefix, right, sgr) = match r.state {
            StepState::Running(t) if last => ("CANCELED ", secs(t.elapsed()), "33"),
            StepState::Running(t) => ("", secs(t.elapsed()), "34"),
            StepState::Done(d) => ("", format!("DONE {}", secs(d)), ""),
            StepState::Cached => ("CACHED ", String::new(), ""),
            StepState::Failed(d) => ("ERROR ", secs(d), "31"),
        };
        let line = two_sided(&format!(" => {prefix}{}", r.name), &right, width);
        let mut out = vec![if sgr.is_empty() {
            line
        } else {
            self.paint(sgr, line)
        }];
        let show_logs = match r.state {
            StepState::Running(_) => !last,
            StepState::Failed(_) => true,
            _ => false,
        };
        if show_logs {
            let skip = r.logs.len().saturating_sub(logs);
            for l in r.logs.iter().skip(skip) {
                out.push(self.paint("2", cut(&format!(" => => # {l}"), width)));
            }
        }
        out
    }

    fn header(&self, width: usize, last: bool) -> String {
        let done = self
            .rows
            .iter()
            .filter(|r| !matches!(r.state, StepState::Running(_)))
            .count();
        let line = format!(
            "[+] Building {} ({done}/{}){}",
            secs(self.begun.elapsed()),
            self.rows.len(),
            if last { " FINISHED" } else { "" }
        );
        cut(&line, width)
    }

    /// The next frame for a `width` x `height` terminal. Lines written out for good leave the
    /// board. `last` draws the final static view: no height limit (it is never redrawn), no
    /// output of running steps, and steps still running marked `CANCELED`.
    pub(crate) fn frame(&mut self, width: usize, height: usize, last: bool) -> Frame {
        let mut committed: Vec<String> = std::mem::take(&mut self.messages);
        // The redrawn part must fit on the screen, or moving the cursor up cannot reach its
        // top; one line is left for the cursor.
        let budget = height.saturating_sub(1).max(2);
        let live_len = |b: &Board, logs: usize| -> usize {
            1 + b
                .rows
                .iter()
                .filter(|r| !r.committed)
                .map(|r| b.step_lines(r, width, logs, last).len())
                .sum::<usize>()
        };
        if !last {
            // Oldest finished steps go above for good until the rest fits.
            while live_len(self, LOG_TAIL) > budget {
                let Some(i) = self
                    .rows
                    .iter()
                    .position(|r| !r.committed && !matches!(r.state, StepState::Running(_)))
                else {
                    break;
                };
                committed.extend(self.step_lines(&self.rows[i], width, LOG_TAIL, false));
                self.rows[i].committed = true;
            }
        }
        let mut logs = LOG_TAIL;
        while !last && logs > 0 && live_len(self, logs) > budget {
            logs -= 1;
        }
        let mut live = vec![self.header(width, last)];
        let pending: Vec<&StepRow> = self.rows.iter().filter(|r| !r.committed).collect();
        for (i, r) in pending.iter().enumerate() {
            let lines = self.step_lines(r, width, logs, last);
            // Still too many running steps: say how many more instead of drawing them (the
            // line saying so must fit too).
            let need = lines.len() + usize::from(i + 1 < pending.len());
            if !last && live.len() + need > budget {
                let rest = pending.len() - i;
                live.push(cut(&format!(" => ... and {rest} more steps"), width));
                break;
            }
            live.extend(lines);
        }
        if last {
            for r in self.rows.iter_mut() {
                r.committed = true;
            }
        }
        Frame { committed, live }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// `text` as a terminal would leave it, without control characters: what follows the last
/// `\r` (a progress bar's latest state), no colours, tabs as spaces; so a line's printed
/// width is its length in chars.
fn printable(text: &str) -> String {
    let text = text
        .trim_end_matches('\r')
        .rsplit('\r')
        .next()
        .unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // An escape sequence: CSI (`ESC [ ... final`) or a two-char one.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for n in chars.by_ref() {
                        if ('@'..='~').contains(&n) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\t' => out.push_str("    "),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Columns `c` may take on a terminal. Without a width table, anything beyond ASCII counts
/// as two (CJK and emoji are): a line may end a little early, but never wraps, which would
/// throw moving the cursor up off by a row.
fn columns(c: char) -> usize {
    if c.is_ascii() {
        1
    } else {
        2
    }
}

fn text_columns(s: &str) -> usize {
    s.chars().map(columns).sum()
}

/// The longest start of `s` that fits in `max` columns.
fn take_columns(s: &str, max: usize) -> &str {
    let mut used = 0;
    for (i, c) in s.char_indices() {
        used += columns(c);
        if used > max {
            return &s[..i];
        }
    }
    s
}

/// `line` cut to fit in `width` columns, leaving the last column free (writing into it puts
/// some terminals in a pending wrap that breaks moving up).
fn cut(line: &str, width: usize) -> String {
    take_columns(line, width.saturating_sub(1).max(1)).to_owned()
}

/// `left` and `right` on one line of `width`, `right` flush with its end; `left` is cut.
fn two_sided(left: &str, right: &str, width: usize) -> String {
    let max = width.saturating_sub(1).max(1);
    if right.is_empty() {
        return cut(left, width);
    }
    let room = max.saturating_sub(text_columns(right) + 1);
    let left = take_columns(left, room);
    let pad = max.saturating_sub(text_columns(left) + text_columns(right));
    format!("{left}{}{right}", " ".repeat(pad))
}

/// Rows and columns of the terminal behind `fd` (80x24 when it is not one).
fn terminal_size(fd: RawFd) -> (usize, usize) {
    // SAFETY: winsize is plain integers; all zeroes is a valid value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills a winsize we own.
    let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 && ws.ws_row > 0 {
        (ws.ws_col as usize, ws.ws_row as usize)
    } else {
        (80, 24)
    }
}

/// The terminal the view is drawn on, and how many lines the last frame left to redraw.
struct Screen {
    out: File,
    live_rows: usize,
}

impl Screen {
    fn draw(&mut self, frame: &Frame) {
        let mut buf = String::with_capacity(4096);
        // Synchronized update (terminals that do not know it ignore it): the frame appears
        // at once.
        buf.push_str("\x1b[?2026h");
        if self.live_rows > 0 {
            buf.push_str(&format!("\x1b[{}A", self.live_rows));
        }
        buf.push('\r');
        for l in frame.committed.iter().chain(frame.live.iter()) {
            buf.push_str(l);
            buf.push_str("\x1b[K\n");
        }
        // The last frame may have been longer.
        buf.push_str("\x1b[J\x1b[?2026l");
        let _ = self.out.write_all(buf.as_bytes());
        let _ = self.out.flush();
        self.live_rows = frame.live.len();
    }
}

/// fd 2 turned into a pipe the view reads, and the real stderr kept to draw on.
struct StderrCapture {
    saved: OwnedFd,
    read: OwnedFd,
    restored: bool,
}

impl StderrCapture {
    fn start() -> std::io::Result<StderrCapture> {
        // SAFETY: plain fd syscalls on fds we own or on fd 2; results are checked.
        unsafe {
            let saved = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3);
            if saved < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let saved = OwnedFd::from_raw_fd(saved);
            let mut p = [0; 2];
            if libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let read = OwnedFd::from_raw_fd(p[0]);
            let write = OwnedFd::from_raw_fd(p[1]);
            // Writers must block when the pipe is full, not lose their message.
            let fl = libc::fcntl(write.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(write.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
            if libc::dup2(write.as_raw_fd(), 2) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(StderrCapture {
                saved,
                read,
                restored: false,
            })
        }
    }

    fn restore(&mut self) {
        if !self.restored {
            // SAFETY: puts the saved terminal fd back as fd 2.
            unsafe { libc::dup2(self.saved.as_raw_fd(), 2) };
            self.restored = true;
        }
    }

    /// Everything in the pipe now, without waiting.
    fn drain(&self, partial: &mut Vec<u8>) -> Vec<String> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            // SAFETY: reading into our buffer from our non-blocking pipe.
            let n =
                unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            partial.extend_from_slice(&buf[..n as usize]);
        }
        let mut lines = Vec::new();
        while let Some(i) = partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]);
            lines.push(text.trim_end_matches('\r').to_owned());
        }
        lines
    }
}

impl Drop for StderrCapture {
    fn drop(&mut self) {
        self.restore();
    }
}

/// The running view: its thread, the flag that stops it and the pipe that wakes it.
pub(crate) struct LiveView {
    stop: Arc<AtomicBool>,
    wake: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

/// A pipe, both ends close-on-exec and non-blocking: (read, write).
fn wake_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut p = [0; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds from pipe2.
    Ok(unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) })
}

impl LiveView {
    /// Starts drawing `board` on stderr; `None` (and nothing changed) when stderr cannot be
    /// taken over.
    pub(crate) fn start(board: Arc<Mutex<Board>>) -> Option<LiveView> {
        let (woken, wake) = wake_pipe().ok()?;
        let capture = StderrCapture::start().ok()?;
        let out = File::from(capture.saved.try_clone().ok()?);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-progress".into())
            .spawn(move || render_loop(board, capture, out, &stop2, woken))
            .ok()?;
        Some(LiveView {
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// Draws the final view, gives stderr back and waits for the thread.
    pub(crate) fn finish(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the thread now rather than at its next tick: a fully cached build is over in
        // less time than a tick.
        // SAFETY: writing one byte from our buffer to our pipe.
        unsafe { libc::write(self.wake.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LiveView {
    fn drop(&mut self) {
        self.finish();
    }
}

fn render_loop(
    board: Arc<Mutex<Board>>,
    mut capture: StderrCapture,
    out: File,
    stop: &AtomicBool,
    woken: OwnedFd,
) {
    let mut screen = Screen { out, live_rows: 0 };
    let mut partial = Vec::new();
    loop {
        let last = stop.load(Ordering::SeqCst);
        if last {
            // No new writer can reach the pipe after this; what is in it is printed below.
            capture.restore();
        }
        let lines = capture.drain(&mut partial);
        let (width, height) = terminal_size(screen.out.as_raw_fd());
        let frame = {
            let mut b = board.lock().unwrap_or_else(|e| e.into_inner());
            for l in lines {
                b.message(l);
            }
            if last && !partial.is_empty() {
                let rest = String::from_utf8_lossy(&partial).into_owned();
                b.message(rest);
                partial.clear();
            }
            b.frame(width, height, last)
        };
        screen.draw(&frame);
        if last {
            return;
        }
        // Sleep until the next tick, waking early when someone writes to stderr or the view
        // is finished.
        let mut pfds = [capture.read.as_raw_fd(), woken.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        let deadline = Instant::now() + TICK;
        while !stop.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let ms = left.as_millis().max(1) as libc::c_int;
            // SAFETY: a valid array of two pollfds.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, ms) };
            if n > 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board() -> Board {
        Board::new(Instant::now(), false)
    }

    #[test]
    fn running_steps_show_their_last_output_lines_and_finished_ones_their_time() {
        let mut b = board();
        b.started(1, "[app 2/3] RUN make");
        for i in 0..10 {
            b.log(1, "[app 2/3] RUN make", format!("line {i}").as_bytes());
        }
        b.cached(0, "[app 1/3] FROM busybox");
        b.started(2, "[deps 2/2] RUN npm ci");
        b.completed(2, "[deps 2/2] RUN npm ci", Duration::from_millis(400));
        let f = b.frame(60, 40, false);
        assert!(f.committed.is_empty());
        assert!(f.live[0].starts_with("[+] Building "), "{:?}", f.live);
        assert!(f.live[0].ends_with("(2/3)"), "{:?}", f.live);
        assert!(f.live[1].starts_with(" => [app 2/3] RUN make"));
        let logs: Vec<&str> = f.live[2..8].iter().map(String::as_str).collect();
        assert_eq!(
            logs,
            [4, 5, 6, 7, 8, 9].map(|i| format!(" => => # line {i}"))
        );
        assert_eq!(f.live[8].trim_end(), " => CACHED [app 1/3] FROM busybox");
        assert!(f.live[9].starts_with(" => [deps 2/2] RUN npm ci"));
        assert!(f.live[9].ends_with("DONE 0.4s"), "{:?}", f.live[9]);
        assert!(f.live.iter().all(|l| l.chars().count() < 60));
    }

    #[test]
    fn a_view_taller_than_the_terminal_writes_finished_steps_out_and_fits_the_rest() {
        let mut b = board();
        for n in 0..30 {
            let name = format!("[s 1/1] step {n}");
            b.started(n, &name);
            if n != 7 {
                b.completed(n, &name, Duration::from_millis(100));
            }
        }
        b.log(7, "[s 1/1] step 7", b"working");
        let f = b.frame(80, 10, false);
        assert!(f.live.len() <= 9, "{:?}", f.live);
        assert!(f.live.iter().any(|l| l.starts_with(" => [s 1/1] step 7 ")));
        assert!(f.live.iter().any(|l| l == " => => # working"));
        // Written out in the order they appeared, and never drawn again.
        assert!(f.committed[0].starts_with(" => [s 1/1] step 0 "));
        let again = b.frame(80, 10, false);
        assert!(again.committed.is_empty());
        assert_eq!(again.live.len(), f.live.len());
        // Many running steps: the view still fits and says how many it left out.
        let mut b = board();
        for n in 0..30 {
            b.started(n, &format!("[s {n}/30] RUN x"));
        }
        let f = b.frame(80, 10, false);
        assert!(f.live.len() <= 9, "{:?}", f.live);
        assert!(f.live.last().unwrap().contains("more steps"));
    }

    #[test]
    fn lines_are_cut_to_the_terminal_width_and_control_characters_dropped() {
        let mut b = board();
        let long = format!("[app 1/1] RUN {}", "x".repeat(200));
        b.started(0, &long);
        b.log(
            0,
            &long,
            "10%\r50%\r\x1b[31mred\x1b[0m progress\t|\r".as_bytes(),
        );
        let f = b.frame(40, 24, false);
        assert!(
            f.live.iter().all(|l| l.chars().count() <= 39),
            "{:?}",
            f.live
        );
        assert!(
            f.live[1].ends_with('s'),
            "elapsed time kept: {:?}",
            f.live[1]
        );
        assert_eq!(f.live[2], " => => # red progress    |");
        // Wide characters take two columns each.
        b.log(0, &long, "漢字".repeat(30).as_bytes());
        let f = b.frame(40, 24, false);
        let last = f.live.last().unwrap();
        assert_eq!(last, &format!(" => => # {}漢", "漢字".repeat(7)), "{last}");
    }

    #[test]
    fn other_stderr_lines_go_above_the_view_and_the_last_frame_marks_unfinished_steps() {
        let mut b = board();
        b.started(0, "[a 1/1] RUN sleep 9");
        b.log(0, "[a 1/1] RUN sleep 9", b"zzz");
        b.message("kiln: warning: something".into());
        let f = b.frame(80, 24, false);
        assert_eq!(f.committed, ["kiln: warning: something"]);
        let f = b.frame(80, 24, true);
        assert!(f.live[0].ends_with("FINISHED"), "{:?}", f.live);
        assert!(f.live[1].starts_with(" => CANCELED [a 1/1] RUN sleep 9"));
        assert_eq!(
            f.live.len(),
            2,
            "no output of a cancelled step: {:?}",
            f.live
        );
    }
}
