//! The HTML report: self-contained, safe against hostile step names, and — checked in a real
//! headless Chromium — drawn without script errors, with lanes, bars and the summary.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_history::{render_report, BuildRecord};

#[test]
fn report_is_self_contained() {
    let html = render_report(&common::example_cold());
    for needle in [
        "<link",
        " src=",
        "@import",
        "url(http",
        "fetch(",
        "XMLHttpRequest",
    ] {
        assert!(
            !html.contains(needle),
            "report must not load anything: found {needle}"
        );
    }
    assert!(html.starts_with("<!DOCTYPE html>"));
    for id in [
        "id=\"timeline\"",
        "id=\"summary\"",
        "id=\"stage-table\"",
        "id=\"critical-table\"",
        "id=\"span-table\"",
    ] {
        assert!(html.contains(id), "{id} missing");
    }
}

#[test]
fn hostile_step_descriptions_stay_text() {
    let mut record = common::example_cold();
    record.steps[3].description = "[x 1/1] RUN echo '</script><script>alert(1)</script><b>'".into();
    let html = render_report(&record);
    assert_eq!(
        html.matches("<script").count(),
        2,
        "only the data block and the page script"
    );
    assert!(
        html.contains("&lt;/script&gt;&lt;script&gt;alert(1)"),
        "summary tables escape it"
    );
    assert!(
        html.contains("\\u003c/script>\\u003cscript>alert(1)"),
        "the data block escapes it"
    );
}

/// Chromium (or Chrome) on `PATH`; fails the test, saying how to install it, when absent.
fn find_chromium() -> PathBuf {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find_map(kiln_test_env::find_program)
        .unwrap_or_else(|| panic!("chromium is not installed: {}", kiln_test_env::INSTALL_HINT))
}

/// Runs headless Chromium on `page` with `extra` flags; returns (stdout, stderr).
fn chromium(bin: &Path, profile: &Path, page: &Path, extra: &[String]) -> (String, String) {
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let (mut out, mut err) = (
        child.stdout.take().expect("stdout"),
        child.stderr.take().expect("stderr"),
    );
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().expect("wait chromium").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (
        out_reader.join().unwrap_or_default(),
        err_reader.join().unwrap_or_default(),
    )
}

/// What the page looks like once its script ran, as Chromium's DOM dump shows it.
struct Rendered {
    dom: String,
    stderr: String,
}

impl Rendered {
    fn count(&self, needle: &str) -> usize {
        self.dom.matches(needle).count()
    }
}

fn render_in_chromium(bin: &Path, dir: &Path, name: &str, html: &str) -> Rendered {
    let page = dir.join(format!("{name}.html"));
    std::fs::write(&page, html).expect("write report");
    let (dom, stderr) = chromium(
        bin,
        &dir.join(format!("profile-{name}")),
        &page,
        &["--dump-dom".into()],
    );
    Rendered { dom, stderr }
}

fn assert_drawn(r: &Rendered, record: &BuildRecord) {
    assert!(
        r.dom.contains("data-rendered=\"ok\""),
        "page script did not finish: {}\n{}",
        &r.dom[..r.dom.len().min(400)],
        r.stderr
    );
    assert!(
        !r.stderr.contains("Uncaught"),
        "console error: {}",
        r.stderr
    );
    assert!(
        r.dom.contains("data-label-overflow=\"0\""),
        "labels wider than their bars"
    );
    let run_bars = r.count("class=\"bar run") + r.count("class=\"bar failed");
    assert_eq!(run_bars, record.steps_run(), "one bar per executed step");
    assert_eq!(
        r.count("class=\"bar span "),
        record.spans.len(),
        "one bar per span"
    );
    assert_eq!(
        r.count("class=\"bar run crit\""),
        kiln_history_critical_len(record)
    );
    if record.steps_cached() > 0 {
        assert!(r.count("class=\"bar cached\"") >= 1);
    }
    let mut stages: Vec<&str> = record
        .steps
        .iter()
        .map(|s| s.stage.as_str())
        .filter(|s| !s.is_empty())
        .collect();
    stages.dedup();
    for stage in stages {
        assert!(
            r.dom.contains(&format!("data-lane=\"{stage}\"")),
            "no lane for stage {stage}"
        );
    }
    assert!(r.dom.contains("<th>total wall time</th>"));
    assert!(r.dom.contains(&format!(
        "{} ran, {} cached",
        record.steps_run(),
        record.steps_cached()
    )));
    // Every bar has its hover details.
    assert_eq!(
        r.count("<rect x=") - r.count("class=\"lane-bg"),
        r.count("<title>") - 1 /* the page title */
    );
}

/// The critical path's length as the report computes it, via the trace's marks.
fn kiln_history_critical_len(record: &BuildRecord) -> usize {
    let trace = kiln_history::chrome_trace(record);
    trace["traceEvents"]
        .as_array()
        .map(|a| a.iter().filter(|e| e["cat"] == "step,critical").count())
        .unwrap_or(0)
}

#[test]
fn report_renders_in_headless_chromium_for_small_and_large_builds() {
    let bin = find_chromium();
    let dir = tempfile::tempdir().expect("tempdir");
    let small = common::example_rebuild("0199aa0000000002", "sha256:bbb222controller", "1.0.0");
    let small5 = BuildRecord {
        steps: small
            .steps
            .iter()
            .filter(|s| s.stage == "app")
            .take(5)
            .cloned()
            .collect(),
        ..small.clone()
    };
    for (name, record) in [
        ("five", small5),
        ("example-cold", common::example_cold()),
        ("example-edit", small),
        ("large", common::large_build("0199ab0000000001", 300, true)),
    ] {
        let r = render_in_chromium(&bin, dir.path(), name, &render_report(&record));
        assert_drawn(&r, &record);
    }
    // A screenshot of the large one: a real PNG with content.
    let page = dir.path().join("large.html");
    let png = dir.path().join("large.png");
    chromium(
        &bin,
        &dir.path().join("profile-shot"),
        &page,
        &[format!("--screenshot={}", png.display())],
    );
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        bytes.len() > 20_000,
        "screenshot too small to hold the timeline: {} bytes",
        bytes.len()
    );
}

#[test]
fn a_broken_report_script_is_detected() {
    let bin = find_chromium();
    let dir = tempfile::tempdir().expect("tempdir");
    let html = render_report(&common::example_cold()).replace("\"lanes\":", "\"lanes\":{},\"x\":");
    let r = render_in_chromium(&bin, dir.path(), "broken", &html);
    assert!(
        r.dom.contains("data-rendered=\"error\""),
        "the page flags its own failure"
    );
    assert!(
        r.stderr.contains("Uncaught"),
        "chromium logs the exception: {}",
        r.stderr
    );
}
