//! `compare`: why steps ran in the second of two builds.

mod common;

use kiln_history::{compare_records, CacheResult};

#[test]
fn one_edited_source_file_is_named_as_the_reason_its_dependents_ran() {
    let before = common::example_cold();
    let after = common::example_rebuild("0199aa0000000002", "sha256:bbb222controller", "1.0.0");
    let cmp = compare_records(&before, &after);
    let ran: Vec<&str> = cmp.ran.iter().map(|c| c.description.as_str()).collect();
    assert_eq!(
        ran,
        vec![
            "[app 5/7] COPY src/ ./src/",
            "[app 6/7] COPY bin/ ./bin/",
            "[app 7/7] RUN echo \"$APP_VERSION\" > VERSION && find . -type f | wc -l > FILES",
        ]
    );
    for c in &cmp.ran {
        assert_eq!(c.root_causes.len(), 1, "{c:?}");
        assert_eq!(c.root_causes[0].input, "file:src/Controller.php");
        assert!(
            c.reason().contains("file src/Controller.php changed"),
            "{}",
            c.reason()
        );
    }
    assert_eq!(cmp.ran[0].changed_inputs.len(), 1);
    assert!(
        cmp.ran[1]
            .reason()
            .starts_with("depends on changed step [app 5/7] COPY src/ ./src/"),
        "{}",
        cmp.ran[1].reason()
    );
    let text = cmp.render_text();
    assert!(
        text.contains("3 step(s) ran in the second build, 0 of them lost a cache hit"),
        "{text}"
    );
    assert!(
        text.contains("why: file src/Controller.php changed (aaa111contro → bbb222contro)"),
        "{text}"
    );
}

#[test]
fn a_changed_build_arg_is_named_with_old_and_new_value() {
    // Second build warm with everything cached, third with APP_VERSION changed.
    let warm = common::example_rebuild("0199aa0000000002", "sha256:aaa111controller", "1.0.0");
    assert_eq!(warm.steps_run(), 0, "an unchanged rebuild is fully cached");
    let bumped = common::example_rebuild("0199aa0000000003", "sha256:aaa111controller", "2.0.0");
    let cmp = compare_records(&warm, &bumped);
    assert_eq!(cmp.ran.len(), 1);
    let c = &cmp.ran[0];
    assert!(c.lost_cache_hit());
    assert_eq!(c.before, Some(CacheResult::CachedLocal));
    assert_eq!(c.reason(), "build arg APP_VERSION changed 1.0.0→2.0.0");
    assert!(cmp.render_text().contains("lost cache"));
}

#[test]
fn a_new_base_image_is_the_reason_for_every_step() {
    let before = common::example_cold();
    let mut after = common::example_cold();
    after.id = "0199aa0000000009".into();
    after.steps[0]
        .inputs
        .insert("base".into(), "sha256:ffff00001111".into());
    for s in after.steps.iter_mut() {
        s.cache_key = s.cache_key.as_ref().map(|k| format!("{k}-new"));
    }
    let cmp = compare_records(&before, &after);
    assert_eq!(cmp.ran.len(), after.steps.len());
    assert!(
        cmp.ran
            .iter()
            .all(|c| c.reason().contains("base image changed")),
        "{}",
        cmp.render_text()
    );
}

#[test]
fn a_rerun_with_an_unchanged_key_says_the_cache_was_missing() {
    let before = common::example_cold();
    let mut after = common::example_cold();
    after.id = "0199aa000000000a".into();
    let cmp = compare_records(&before, &after);
    assert_eq!(cmp.ran.len(), after.steps.len());
    assert!(cmp
        .ran
        .iter()
        .all(|c| c.same_key_rerun && c.reason().starts_with("same cache key")));
}

#[test]
fn slower_and_faster_steps_are_listed() {
    let before = common::example_cold();
    let mut after = common::example_cold();
    after.id = "0199aa000000000b".into();
    let slow = after
        .steps
        .iter_mut()
        .find(|s| s.description.contains("php-ext 3/3"))
        .expect("compile step");
    slow.end_ms = slow.end_ms.map(|e| e + 3000);
    let fast = after
        .steps
        .iter_mut()
        .find(|s| s.description.contains("npm-deps 3/5"))
        .expect("npm step");
    fast.end_ms = fast.start_ms.map(|s| s + 500);
    let cmp = compare_records(&before, &after);
    let slower: Vec<_> = cmp.slower().iter().map(|c| c.description.clone()).collect();
    let faster: Vec<_> = cmp.faster().iter().map(|c| c.description.clone()).collect();
    assert_eq!(slower, vec!["[php-ext 3/3] RUN compile modules/kiln.so"]);
    assert_eq!(faster, vec!["[npm-deps 3/5] RUN npm ci (busybox loop)"]);
}
