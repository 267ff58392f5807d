//! The recorder, fed from several threads as the solver's event sink would.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kiln_history::{BuildStatus, CacheResult, Recorder, SpanKind, StepInfo};

#[test]
fn events_from_many_threads_become_one_record() {
    let rec = Arc::new(Recorder::new(
        "release",
        vec!["kiln".into(), "build".into()],
    ));
    rec.declare_step(
        0,
        StepInfo {
            description: "[internal] base".into(),
            ..Default::default()
        },
    );
    for n in 1..=8usize {
        rec.declare_step(
            n,
            StepInfo {
                description: format!("[app {n}/8] RUN step {n}"),
                stage: "app".into(),
                depends_on: vec![0],
                inputs: BTreeMap::from([(format!("file:src/{n}.php"), format!("sha256:{n}"))]),
            },
        );
    }
    rec.step_cached(0, "sha256:k0", Some("reg/app:cache"));
    let threads: Vec<_> = (1..=8usize)
        .map(|n| {
            let rec = rec.clone();
            std::thread::spawn(move || {
                let key = format!("sha256:k{n}");
                if n % 2 == 0 {
                    rec.step_cached(n, &key, None);
                } else if n == 7 {
                    rec.step_started(n, &key);
                    rec.step_failed(n, "exit code 2");
                } else {
                    rec.step_started(n, &key);
                    let _span = rec.span(SpanKind::Compress, &format!("layer {n}"));
                    rec.add_bytes_uploaded(10);
                    rec.step_completed(n, &key, Duration::from_millis(1));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("recording thread panicked");
    }
    let pull = rec.span_begin(SpanKind::Pull, "busybox");
    rec.span_add_bytes(pull, 100);
    rec.span_end(pull, 23);
    rec.add_bytes_downloaded(123);
    rec.set_image_digest("sha256:img");
    let record = rec.finish(Err("step 7 failed".into()), false);

    assert_eq!(record.id, rec.id());
    assert_eq!(record.status, BuildStatus::Failed);
    assert_eq!(record.error.as_deref(), Some("step 7 failed"));
    assert_eq!(record.steps.len(), 9);
    assert_eq!(
        record.steps[0].cache,
        CacheResult::CachedRemote("reg/app:cache".into())
    );
    assert_eq!(record.steps_cached(), 5);
    assert_eq!(record.steps_run(), 4, "1, 3, 5 ran, 7 ran and failed");
    let s7 = record.step(7).expect("step 7");
    assert_eq!(s7.cache, CacheResult::Failed);
    assert_eq!(s7.error.as_deref(), Some("exit code 2"));
    let s3 = record.step(3).expect("step 3");
    assert!(s3.start_ms.is_some() && s3.end_ms >= s3.start_ms);
    assert_eq!(
        s3.inputs.get("file:src/3.php").map(String::as_str),
        Some("sha256:3")
    );
    assert_eq!(s3.depends_on, vec![0]);
    assert_eq!(
        record
            .spans
            .iter()
            .filter(|s| s.kind == SpanKind::Compress)
            .count(),
        3
    );
    let p = record
        .spans
        .iter()
        .find(|s| s.kind == SpanKind::Pull)
        .expect("pull span");
    assert_eq!(p.bytes, 123);
    assert_eq!((record.bytes_downloaded, record.bytes_uploaded), (123, 30));
    assert_eq!(record.image_digest.as_deref(), Some("sha256:img"));
}

#[test]
fn steps_still_running_at_finish_are_marked_unfinished() {
    let rec = Recorder::new("app", vec![]);
    rec.step_started(4, "sha256:k4");
    let open = rec.span_begin(SpanKind::Push, "reg/app:1");
    let _ = open;
    let record = rec.finish(Ok(()), true);
    assert_eq!(record.status, BuildStatus::Cancelled);
    let s = record.step(4).expect("step created by its first event");
    assert_eq!(s.description, "step 4");
    assert_eq!(s.cache, CacheResult::Failed);
    assert_eq!(s.error.as_deref(), Some("did not finish"));
    assert!(record.spans[0].end_ms >= record.spans[0].start_ms);
}

#[test]
fn completed_without_started_takes_its_start_from_the_duration() {
    let rec = Recorder::new("app", vec![]);
    std::thread::sleep(Duration::from_millis(30));
    rec.step_completed(1, "sha256:k", Duration::from_millis(20));
    let record = rec.finish(Ok(()), false);
    let s = record.step(1).expect("step");
    assert_eq!(s.duration_ms(), Some(20));
    assert!(s.start_ms.unwrap_or(0) >= 10);
}

#[test]
fn build_ids_sort_by_start_time() {
    let a = Recorder::new("x", vec![]);
    std::thread::sleep(Duration::from_millis(3));
    let b = Recorder::new("x", vec![]);
    assert_eq!(a.id().len(), 20);
    assert!(b.id() > a.id());
}
