//! What a person watching `kiln build` sees, end to end (root: real containers): the live
//! `--progress tty` view under a real pseudo-terminal, `auto` choosing plain lines without
//! one, and Ctrl-C cancelling a build cleanly.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{require_root, Fixture};

fn kiln() -> &'static str {
    env!("CARGO_BIN_EXE_kiln")
}

/// The frames of a tty view: what each redraw wrote, as plain lines (escape sequences
/// and carriage returns removed).
fn frames(out: &str) -> Vec<Vec<String>> {
    out.split("\x1b[?2026h")
        .skip(1)
        .map(|f| {
            strip_escapes(f)
                .lines()
                .map(|l| l.trim_end().to_owned())
                .filter(|l| !l.is_empty())
                .collect()
        })
        .collect()
}

fn strip_escapes(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for n in chars.by_ref() {
                        if ('@'..='~').contains(&n) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// A step line of `stage` shown running: its name and elapsed time, not DONE, CACHED or
/// ERROR (those come before the name or at the end).
fn shows_running(frame: &[String], stage: &str) -> bool {
    frame.iter().any(|l| {
        l.starts_with(&format!(" => [{stage} 2/2] RUN")) && !l.contains("DONE") && l.ends_with('s')
    })
}

/// Runs `kiln ARGS` under a pseudo-terminal of 160x50 (util-linux `script`); returns
/// whether it succeeded and everything the terminal got.
fn under_pty(root: &Path, dir: &Path, args: &str) -> (bool, String) {
    under_pty_sized(root, dir, args, 160, 50)
}

/// [`under_pty`] on a terminal of `cols` x `rows`.
fn under_pty_sized(root: &Path, dir: &Path, args: &str, cols: u16, rows: u16) -> (bool, String) {
    let cmd = format!(
        "stty cols {cols} rows {rows}; exec {} --root {} {args}",
        kiln(),
        root.display()
    );
    let out = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux) is installed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn tty_progress_redraws_parallel_stages_with_their_output_and_a_rebuild_shows_cached() {
    require_root("tty_progress_redraws...");
    let f = Fixture::new();
    let dir = f.path("tty-ctx");
    std::fs::create_dir_all(&dir).unwrap();
    // The two stages meet through a shared cache mount, so each is seen running while the
    // other runs, whatever the machine's speed (and give up waiting after a minute).
    let step = |me: &str, other: &str| {
        format!(
            "RUN --mount=type=cache,target=/sync,id=tty-meet echo {me}-marker-start; \
             touch /sync/{me}; i=0; \
             while [ ! -e /sync/{other} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
             echo {me}-marker-met; sleep 1.5; echo {me}-marker-end\n"
        )
    };
    let dockerfile = format!(
        "FROM busybox:latest AS alpha\n{}FROM busybox:latest AS beta\n{}\
         FROM busybox:latest\nCOPY --from=alpha /etc/passwd /a\nCOPY --from=beta /etc/passwd /b\n",
        step("alpha", "beta"),
        step("beta", "alpha"),
    );
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();

    let (ok, out) = under_pty(&f.root(), &dir, "build . --progress tty");
    assert!(ok, "build failed:\n{out}");
    let cursor_up = cursor_ups(&out).len();
    assert!(
        cursor_up > 5,
        "expected redraws moving the cursor up:\n{out}"
    );
    let frames = frames(&out);
    assert!(
        frames
            .iter()
            .any(|f| f.first().is_some_and(|h| h.starts_with("[+] Building "))),
        "no header in any frame:\n{out}"
    );
    assert!(
        frames
            .iter()
            .any(|f| shows_running(f, "alpha") && shows_running(f, "beta")),
        "no frame shows both stages running at once:\n{frames:#?}"
    );
    assert!(
        frames
            .iter()
            .any(|f| shows_running(f, "alpha")
                && f.iter().any(|l| l == " => => # alpha-marker-start")),
        "no frame shows a running step's output:\n{frames:#?}"
    );
    let last = frames.last().unwrap();
    assert!(
        last.iter()
            .any(|l| l.starts_with("[+] Building ") && l.ends_with("FINISHED")),
        "final view: {last:#?}"
    );
    assert!(
        last.iter()
            .any(|l| l.starts_with(" => [alpha 2/2] RUN") && l.contains("DONE")),
        "final view: {last:#?}"
    );
    let text = strip_escapes(&out);
    assert!(
        text.contains("built target stage-2 in ") && text.contains("steps run, 0 cached"),
        "summary missing:\n{text}"
    );

    let (ok, again) = under_pty(&f.root(), &dir, "build . --progress tty");
    assert!(ok, "rebuild failed:\n{again}");
    let text = strip_escapes(&again);
    assert!(
        text.contains(" => CACHED [stage-2 3/3] COPY --from=beta"),
        "rebuild view:\n{text}"
    );
    assert!(text.contains("0 steps run, 1 cached"), "summary:\n{text}");
}

/// The N of every "cursor up N lines" sequence in `out`.
fn cursor_ups(out: &str) -> Vec<usize> {
    out.split("\x1b[")
        .skip(1)
        .filter_map(|s| {
            let digits = s.chars().take_while(char::is_ascii_digit).count();
            s[digits..]
                .starts_with('A')
                .then(|| s[..digits].parse().ok())
                .flatten()
        })
        .collect()
}

#[test]
fn tty_view_on_a_terminal_shorter_than_the_build_never_redraws_above_the_screen() {
    require_root("tty_view_on_a_terminal_shorter...");
    let f = Fixture::new();
    let dir = f.path("short-ctx");
    std::fs::create_dir_all(&dir).unwrap();
    let mut dockerfile = String::new();
    for stage in ["left", "right"] {
        dockerfile.push_str(&format!("FROM busybox:latest AS {stage}\n"));
        for n in 1..=6 {
            dockerfile.push_str(&format!(
                "RUN echo {stage}-step-{n} > /{n} && echo {stage}-output-{n}\n"
            ));
        }
    }
    dockerfile.push_str("FROM busybox:latest\nCOPY --from=left /6 /l\nCOPY --from=right /6 /r\n");
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    let (rows, cols) = (8, 70);
    let (ok, out) = under_pty_sized(&f.root(), &dir, "build . --progress tty", cols, rows);
    assert!(ok, "build failed:\n{out}");
    let ups = cursor_ups(&out);
    assert!(!ups.is_empty(), "no redraws:\n{out}");
    // Moving up further than the screen is tall cannot reach the view's top: it would garble.
    assert!(
        ups.iter().all(|&n| n < rows as usize),
        "moved up {ups:?} on a terminal of {rows} rows"
    );
    let text = strip_escapes(&out);
    assert!(
        text.lines()
            .all(|l| l.trim_end().chars().count() < cols as usize),
        "a line wider than the terminal:\n{text}"
    );
    // Every step was shown, finished ones kept above the redrawn part.
    for stage in ["left", "right"] {
        for n in 2..=7 {
            let name = format!(" => [{stage} {n}/7] RUN echo");
            assert!(text.contains(&name), "{name} never shown:\n{text}");
        }
    }
    assert!(text.contains("FINISHED"), "{text}");
    assert!(text.contains("built target stage-2 in "), "{text}");
}

#[test]
fn auto_progress_without_a_terminal_prints_plain_lines() {
    require_root("auto_progress_without_a_terminal...");
    let f = Fixture::new();
    let dir = f.path("plain-ctx");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox:latest\nRUN echo plain-marker\n",
    )
    .unwrap();
    let out = Command::new(kiln())
        .arg("--root")
        .arg(f.root())
        .args(["build", ".", "--progress", "auto"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        !err.contains('\x1b'),
        "escape sequences in plain output:\n{err}"
    );
    let lines: Vec<&str> = err.lines().collect();
    let run = lines
        .iter()
        .find(|l| l.contains("[stage-0 2/2] RUN echo plain-marker"))
        .unwrap_or_else(|| panic!("no step line:\n{err}"));
    let num = run.split(' ').next().unwrap();
    assert!(num.starts_with('#'), "{run}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{num} ")) && l.ends_with(" plain-marker")),
        "no output line of the step:\n{err}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&format!("{num} DONE "))),
        "no DONE line:\n{err}"
    );
    assert!(err.contains("built target stage-0 in "), "{err}");
}

/// Pids of processes whose command line holds `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    processes_where(|argv| argv.iter().any(|a| a.contains(needle)))
}

/// Pids of the steps' sleeps: processes whose program name (argv 0) holds `needle`.
fn sleepers(needle: &str) -> Vec<u32> {
    processes_where(|argv| argv.first().is_some_and(|a| a.contains(needle)))
}

fn processes_where(pick: impl Fn(&[String]) -> bool) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let argv: Vec<String> = cmd
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if pick(&argv) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// `kiln build` in its own process group (as a shell runs a foreground job), its rawjson
/// events read line by line.
struct RunningBuild {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl RunningBuild {
    fn start(f: &Fixture, dir: &Path, meta: &Path) -> Self {
        Self::start_with(f, dir, meta, &[])
    }

    fn start_with(f: &Fixture, dir: &Path, meta: &Path, extra: &[&str]) -> Self {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(kiln())
            .arg("--root")
            .arg(f.root())
            .args(["build", ".", "--progress", "rawjson", "--metadata-file"])
            .arg(meta)
            .args(extra)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        RunningBuild {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits (a generous while) until a step printed each of `markers`.
    fn wait_for_output(&mut self, markers: &[&str]) {
        self.wait_for_events(markers, |v, m| v["event"] == "log" && v["data"] == m);
    }

    /// Waits (a generous while) until, for each of `wanted`, an event matches it.
    fn wait_for_events(
        &mut self,
        wanted: &[&str],
        matches: impl Fn(&serde_json::Value, &str) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(180);
        let printed = |seen: &[String], m: &str| {
            seen.iter()
                .any(|l| serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| matches(&v, m)))
        };
        let markers = wanted;
        while !markers.iter().all(|m| printed(&self.seen, m)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "the build never printed {markers:?}:\n{}",
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    /// Waits for exit (a generous while, then kills it and fails); returns success and the
    /// whole stderr.
    fn wait(self) -> (bool, String) {
        let (status, stderr) = self.wait_status();
        (status.success(), stderr)
    }

    /// [`RunningBuild::wait`], with the exit status.
    fn wait_status(mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("kiln did not exit:\n{}", self.seen.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The reader ends when the pipe closes.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.seen.push(l);
        }
        (status, self.seen.join("\n"))
    }

    /// Sends `sig` to the build's whole process group, as a terminal does on Ctrl-C.
    fn signal_group(&self, sig: i32) {
        // SAFETY: kill(2) on the process group we created.
        unsafe { libc::kill(-(self.child.id() as i32), sig) };
    }
}

fn wait_for_sleepers(needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while sleepers(needle).len() < count {
        assert!(
            Instant::now() < deadline,
            "{count} processes with {needle} never appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ctrl_c_cancels_a_build_cleanly_and_the_next_build_reruns_the_cancelled_steps() {
    require_root("ctrl_c_cancels_a_build_cleanly...");
    let f = Fixture::new();
    let dir = f.path("cancel-ctx");
    std::fs::create_dir_all(&dir).unwrap();
    // Each step sleeps in a process named by a path found nowhere else on the machine.
    let unique = format!(
        "kiln-cancel-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let step = |name: &str| {
        format!(
            "RUN mkdir -p /tmp/{unique}-{name} && ln -s /bin/busybox /tmp/{unique}-{name}/sleep; \
             echo {name}-started; /tmp/{unique}-{name}/sleep 300; echo {name}-finished\n"
        )
    };
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM busybox:latest AS one\n{}FROM busybox:latest AS two\n{}\
             FROM busybox:latest\nCOPY --from=one /tmp /one\nCOPY --from=two /tmp /two\n",
            step("one"),
            step("two")
        ),
    )
    .unwrap();

    let mut build = RunningBuild::start(&f, &dir, &f.path("cancelled.json"));
    build.wait_for_output(&["one-started", "two-started"]);
    wait_for_sleepers(&unique, 2);
    build.signal_group(libc::SIGINT);
    // A second Ctrl-C while it cleans up must not make things worse.
    std::thread::sleep(Duration::from_millis(100));
    build.signal_group(libc::SIGINT);
    let (status, stderr) = build.wait_status();
    assert_eq!(
        status.code(),
        Some(130),
        "a build cancelled by Ctrl-C exits 130, as a shell reports SIGINT:\n{stderr}"
    );
    assert!(stderr.contains("build cancelled"), "{stderr}");
    // The terminal's SIGINT reached kiln only: no step died of it and failed on its own.
    assert!(
        !stderr.contains("\"event\":\"failed\""),
        "a step failed instead of being cancelled:\n{stderr}"
    );
    assert!(
        !stderr
            .lines()
            .any(|l| l.contains("\"data\":\"one-finished\"")
                || l.contains("\"data\":\"two-finished\"")),
        "a step went on past its interrupted sleep:\n{stderr}"
    );
    assert_eq!(
        processes_with(&unique),
        Vec::<u32>::new(),
        "step processes outlived the cancelled build"
    );
    let root = f.root().display().to_string();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mountinfo.lines().filter(|l| l.contains(&root)).collect();
    assert!(left.is_empty(), "mounts left behind: {left:#?}");
    f.assert_store_clean("after the cancel");

    // The same Dockerfile again: the cancelled steps run (nothing of them was recorded).
    let meta = f.path("again.json");
    let mut again = RunningBuild::start(&f, &dir, &meta);
    again.wait_for_output(&["one-started", "two-started"]);
    wait_for_sleepers(&unique, 2);
    for pid in sleepers(&unique) {
        // SAFETY: kill(2) on a step's sleep, so the step goes on and ends.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let (ok, stderr) = again.wait();
    assert!(ok, "the build after the cancel failed:\n{stderr}");
    assert!(
        stderr.contains("\"data\":\"one-finished\"")
            && stderr.contains("\"data\":\"two-finished\""),
        "{stderr}"
    );
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let steps = meta["kiln.steps"].as_array().unwrap();
    for stage in ["one", "two"] {
        let s = steps
            .iter()
            .find(|s| {
                s["name"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("[{stage} 2/2] RUN"))
            })
            .unwrap_or_else(|| panic!("no {stage} RUN step in {steps:#?}"));
        assert_eq!(s["status"], "run", "{s}");
    }
}

#[test]
fn a_failing_step_stops_the_steps_running_beside_it_and_leaves_the_store_sound() {
    require_root("a_failing_step_stops...");
    let f = Fixture::new();
    let dir = f.path("fail-ctx");
    std::fs::create_dir_all(&dir).unwrap();
    let unique = format!("kiln-sibling-{}", std::process::id());
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM busybox:latest AS long\n\
             RUN mkdir -p /tmp/{unique} && ln -s /bin/busybox /tmp/{unique}/sleep; \
             echo long-started; /tmp/{unique}/sleep 300\n\
             FROM busybox:latest AS bad\n\
             RUN echo bad-started; sleep 1; exit 3\n\
             FROM busybox:latest\nCOPY --from=long /tmp /long\nCOPY --from=bad /tmp /bad\n"
        ),
    )
    .unwrap();
    let mut build = RunningBuild::start(&f, &dir, &f.path("failed.json"));
    build.wait_for_output(&["bad-started"]);
    // Without the sibling being stopped, kiln would wait out its five minutes.
    let (ok, stderr) = build.wait();
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("exit") || stderr.contains("code 3"),
        "{stderr}"
    );
    assert_eq!(processes_with(&unique), Vec::<u32>::new());
    f.assert_store_clean("after the failed build");
}

#[test]
fn ctrl_c_typed_in_a_terminal_cancels_and_the_view_says_so_on_whole_lines() {
    require_root("ctrl_c_typed_in_a_terminal...");
    use std::io::{Read, Write};
    let f = Fixture::new();
    let dir = f.path("tty-cancel-ctx");
    std::fs::create_dir_all(&dir).unwrap();
    let unique = format!("kiln-tty-cancel-{}", std::process::id());
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM busybox:latest\n\
             RUN mkdir -p /tmp/{unique} && ln -s /bin/busybox /tmp/{unique}/sleep; \
             echo tty-cancel-started; /tmp/{unique}/sleep 300\n"
        ),
    )
    .unwrap();
    let cmd = format!(
        "stty cols 160 rows 50; exec {} --root {} build . --progress tty",
        kiln(),
        f.root().display()
    );
    // The terminal's input is a pipe: a ^C written to it is a key press.
    let mut child = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("script (util-linux) is installed");
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !String::from_utf8_lossy(&out).contains("=> => # tty-cancel-started") {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(b) => out.extend(b),
            Err(_) => {
                let _ = child.kill();
                panic!("the step never ran:\n{}", String::from_utf8_lossy(&out));
            }
        }
    }
    wait_for_sleepers(&unique, 1);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"\x03").unwrap();
    stdin.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("kiln did not exit:\n{}", String::from_utf8_lossy(&out));
        }
        while let Ok(b) = rx.try_recv() {
            out.extend(b);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(stdin);
    while let Ok(b) = rx.recv_timeout(Duration::from_secs(10)) {
        out.extend(b);
    }
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(!status.success(), "{out}");
    let frames = frames(&out);
    // kiln's own message went above the view as a whole line, inside a redraw.
    assert!(
        frames
            .iter()
            .any(|f| f.iter().any(|l| l == "kiln: cancelling the build (Ctrl-C)")),
        "the cancel message is not a line of its own in any frame:\n{frames:#?}"
    );
    let last = frames.last().unwrap();
    assert!(
        last.iter()
            .any(|l| l.starts_with(" => CANCELED [stage-0 2/2] RUN")),
        "final view: {last:#?}"
    );
    assert!(strip_escapes(&out).contains("build cancelled"), "{out}");
    assert_eq!(processes_with(&unique), Vec::<u32>::new());
}

#[test]
fn ctrl_c_while_another_build_runs_the_same_step_exits_without_waiting_for_it() {
    require_root("ctrl_c_while_another_build...");
    let f = Fixture::new();
    let dir = f.path("shared-ctx");
    std::fs::create_dir_all(&dir).unwrap();
    let unique = format!("kiln-shared-{}", std::process::id());
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM busybox:latest\n\
             RUN mkdir -p /tmp/{unique} && ln -s /bin/busybox /tmp/{unique}/sleep; \
             echo shared-started; /tmp/{unique}/sleep 300; echo shared-finished\n"
        ),
    )
    .unwrap();
    let mut first = RunningBuild::start(&f, &dir, &f.path("first.json"));
    first.wait_for_output(&["shared-started"]);
    wait_for_sleepers(&unique, 1);
    // The second build of the same step waits for the first one's lock on its cache key.
    let mut second = RunningBuild::start(&f, &dir, &f.path("second.json"));
    second.wait_for_events(&["completed"], |v, m| v["event"] == m);
    std::thread::sleep(Duration::from_millis(500));
    second.signal_group(libc::SIGINT);
    // Its step sleeps five minutes: exiting within the wait below means it did not wait.
    let (ok, stderr) = second.wait();
    assert!(!ok, "a cancelled build must fail:\n{stderr}");
    assert!(stderr.contains("build cancelled"), "{stderr}");
    assert_eq!(
        sleepers(&unique).len(),
        1,
        "the first build's step must go on"
    );
    for pid in sleepers(&unique) {
        // SAFETY: kill(2) on the step's sleep, so the first build goes on and ends.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let (ok, stderr) = first.wait();
    assert!(ok, "the first build failed:\n{stderr}");
    f.assert_store_clean("at the end");
}

#[test]
fn ctrl_c_while_pushing_the_image_stops_kiln_at_once() {
    require_root("ctrl_c_while_pushing...");
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let f = Fixture::new();
    let dir = f.path("push-ctx");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox:latest\nRUN echo pushed > /p\n",
    )
    .unwrap();
    // A "registry" that accepts connections and never answers: the push hangs there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let server = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        held.push(conn);
                        let _ = tx.send(());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    });
    let output = format!("type=image,name=127.0.0.1:{port}/app:1,push=true,registry.insecure=true");
    let build = RunningBuild::start_with(&f, &dir, &f.path("push.json"), &["--output", &output]);
    rx.recv_timeout(Duration::from_secs(180))
        .expect("kiln never connected to the registry to push");
    build.signal_group(libc::SIGINT);
    let (status, stderr) = build.wait_status();
    stop.store(true, Ordering::SeqCst);
    server.join().unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("kiln: interrupted while exporting (Ctrl-C)"),
        "{stderr}"
    );
}
