//! The Chrome trace-event file.

mod common;

use std::collections::HashSet;

use kiln_history::chrome_trace;

#[test]
fn trace_has_one_complete_event_per_executed_step() {
    for record in [
        common::example_cold(),
        common::example_rebuild("0199aa0000000002", "sha256:edited", "1.0.0"),
        common::large_build("0199ab", 300, true),
    ] {
        // Round-trip through text, as Perfetto reads it.
        let text = serde_json::to_string(&chrome_trace(&record)).expect("encode");
        let doc: serde_json::Value = serde_json::from_str(&text).expect("trace is JSON");
        let events = doc["traceEvents"].as_array().expect("traceEvents array");
        let steps: Vec<_> = events
            .iter()
            .filter(|e| e["ph"] == "X" && e["cat"].as_str().is_some_and(|c| c.starts_with("step")))
            .collect();
        let executed: HashSet<String> = record
            .steps
            .iter()
            .filter(|s| s.executed())
            .map(|s| s.description.clone())
            .collect();
        assert_eq!(steps.len(), executed.len());
        let names: HashSet<String> = steps
            .iter()
            .map(|e| e["name"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(names, executed);
        for e in events {
            assert!(
                e["pid"].is_u64() && e["tid"].is_u64() && e["name"].is_string(),
                "{e}"
            );
            match e["ph"].as_str() {
                Some("X") => assert!(e["ts"].is_u64() && e["dur"].is_u64(), "{e}"),
                Some("i") => assert_eq!(e["cat"], "cached"),
                Some("M") => {}
                other => panic!("unexpected phase {other:?}"),
            }
        }
        let step = record
            .steps
            .iter()
            .find(|s| s.executed())
            .expect("an executed step");
        let ev = steps
            .iter()
            .find(|e| e["name"] == step.description.as_str())
            .expect("its event");
        assert_eq!(ev["ts"].as_u64(), step.start_ms.map(|s| s * 1000));
        assert_eq!(ev["dur"].as_u64(), step.duration_ms().map(|d| d * 1000));
        assert_eq!(ev["args"]["cache"], "run");
        let spans = events
            .iter()
            .filter(|e| e["ph"] == "X" && !e["cat"].as_str().unwrap_or("").starts_with("step"))
            .count();
        assert_eq!(spans, record.spans.len());
        let cached = events.iter().filter(|e| e["ph"] == "i").count();
        assert_eq!(cached, record.steps_cached());
    }
}

#[test]
fn each_stage_gets_its_own_named_thread() {
    let record = common::example_cold();
    let doc = chrome_trace(&record);
    let events = doc["traceEvents"].as_array().expect("events");
    let threads: Vec<&str> = events
        .iter()
        .filter(|e| e["name"] == "thread_name")
        .filter_map(|e| e["args"]["name"].as_str())
        .collect();
    for stage in [
        "stage composer-deps",
        "stage npm-deps",
        "stage php-ext",
        "stage app",
        "pull",
        "push",
    ] {
        assert!(threads.contains(&stage), "{stage} missing from {threads:?}");
    }
    let compile = events
        .iter()
        .find(|e| e["name"] == "[php-ext 3/3] RUN compile modules/kiln.so")
        .expect("compile event");
    let npm = events
        .iter()
        .find(|e| e["name"] == "[npm-deps 3/5] RUN npm ci (busybox loop)")
        .expect("npm event");
    assert_ne!(compile["tid"], npm["tid"]);
}
