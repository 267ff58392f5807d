//! The history store on disk.

mod common;

use kiln_history::{HistoryError, HistoryStore};

#[test]
fn builds_are_listed_newest_first_and_pruned_beyond_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = HistoryStore::new(dir.path()).with_limits(3, u64::MAX);
    for n in 1..=5u64 {
        let mut r = common::example_cold();
        r.id = format!("{:012x}{:08x}", 1_000 + n, n);
        store.save(&r).expect("save");
    }
    let ids = store.ids().expect("ids");
    assert_eq!(
        ids,
        vec![
            "0000000003ed00000005",
            "0000000003ec00000004",
            "0000000003eb00000003"
        ]
    );
    let leftovers: Vec<_> = std::fs::read_dir(store.dir())
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        3,
        "no temp files left behind: {leftovers:?}"
    );
    assert_eq!(
        store.find("latest").expect("latest").id,
        "0000000003ed00000005"
    );
    let loaded = store.load("0000000003eb00000003").expect("load");
    assert_eq!(loaded.steps.len(), common::example_cold().steps.len());
}

#[test]
fn size_cap_prunes_oldest_but_keeps_the_newest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = HistoryStore::new(dir.path()).with_limits(100, 1);
    for n in 1..=3u64 {
        let mut r = common::example_cold();
        r.id = format!("{:012x}{:08x}", n, 0);
        store.save(&r).expect("save");
    }
    assert_eq!(
        store.ids().expect("ids"),
        vec![format!("{:012x}{:08x}", 3, 0)]
    );
}

#[test]
fn ids_resolve_by_unique_prefix_and_refuse_ambiguous_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = HistoryStore::new(dir.path());
    for id in [
        "0199aa00000000000001",
        "0199ab00000000000002",
        "0199ab00000000000003",
    ] {
        let mut r = common::example_cold();
        r.id = id.into();
        store.save(&r).expect("save");
    }
    assert_eq!(
        store.resolve("0199aa").expect("unique"),
        "0199aa00000000000001"
    );
    match store.resolve("0199ab") {
        Err(HistoryError::Ambiguous { matches, .. }) => assert_eq!(matches.len(), 2),
        other => panic!("expected ambiguity, got {other:?}"),
    }
    let err = store.resolve("ffff").expect_err("no match");
    assert!(err.to_string().contains("kiln history ls"), "{err}");
}

#[test]
fn empty_history_has_no_latest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = HistoryStore::new(dir.path());
    assert!(store.ids().expect("ids").is_empty());
    assert!(matches!(
        store.find("latest"),
        Err(HistoryError::NotFound { .. })
    ));
}

#[test]
fn damaged_and_newer_records_give_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = HistoryStore::new(dir.path());
    std::fs::create_dir_all(store.dir()).expect("mkdir");
    std::fs::write(
        store.dir().join("00000000000100000000.json"),
        b"{\"version\": 1, \"id\": ",
    )
    .expect("write");
    let err = store.load("00000000000100000000").expect_err("damaged");
    assert!(matches!(err, HistoryError::Parse { .. }));
    assert!(err.to_string().contains("line 1"), "{err}");
    std::fs::write(
        store.dir().join("00000000000200000000.json"),
        b"{\"version\": 99}",
    )
    .expect("write");
    let err = store.load("00000000000200000000").expect_err("too new");
    assert!(
        matches!(err, HistoryError::TooNew { version: 99, .. }),
        "{err}"
    );
}

#[test]
fn report_and_trace_files_are_written_whole_without_temp_leftovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = common::example_cold();
    let (html, trace) = (dir.path().join("r.html"), dir.path().join("t.json"));
    kiln_history::write_report(&record, &html).expect("report");
    kiln_history::write_trace(&record, &trace).expect("trace");
    assert_eq!(
        std::fs::read_to_string(&html).expect("read"),
        kiln_history::render_report(&record)
    );
    let parsed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&trace).expect("read")).expect("json");
    assert_eq!(parsed, kiln_history::chrome_trace(&record));
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 2);
    let err = kiln_history::write_report(&record, &dir.path().join("missing/r.html"))
        .expect_err("no such dir");
    assert!(err.to_string().contains("missing/r.html"), "{err}");
}
