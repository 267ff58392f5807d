//! `-t`/`--push`, `--output` and the cache flags (both spellings) parse into a build's
//! exports, and bad values name the flag as spelled.

use kiln_build::{ExportFlags, Exports};
use kiln_graph::options::OutputKind;
use kiln_graph::OptionError;

fn ok(flags: ExportFlags) -> Exports {
    flags.parse().unwrap_or_else(|e| panic!("{e}"))
}

fn err(flags: ExportFlags) -> OptionError {
    flags.parse().expect_err("should fail")
}

#[test]
fn tags_and_push_become_a_registry_output() {
    let o = ok(ExportFlags {
        tags: vec!["r/app:1".into(), "r/app:latest".into()],
        push: true,
        ..Default::default()
    });
    assert_eq!(o.outputs.len(), 1);
    assert_eq!(
        (o.outputs[0].kind, o.outputs[0].push),
        (OutputKind::Registry, true)
    );
    assert_eq!(o.outputs[0].names, ["r/app:1", "r/app:latest"]);
    let o = ok(ExportFlags {
        tags: vec!["r/app:1".into()],
        outputs: vec!["type=image".into()],
        ..Default::default()
    });
    assert_eq!((o.outputs[0].names.len(), o.outputs[0].push), (1, false));
    assert_eq!(
        err(ExportFlags {
            push: true,
            ..Default::default()
        })
        .flag,
        "--push"
    );
    assert_eq!(
        err(ExportFlags {
            tags: vec!["bad tag".into()],
            ..Default::default()
        })
        .flag,
        "--tag"
    );
}

#[test]
fn cache_flags_keep_their_own_names_in_errors() {
    let e = err(ExportFlags {
        cache_to: vec![("--cache-to".into(), "type=gha".into())],
        ..Default::default()
    });
    assert_eq!(e.flag, "--cache-to");
    let e = err(ExportFlags {
        cache_from: vec![("--import-cache".into(), "type=gha".into())],
        ..Default::default()
    });
    assert_eq!(e.flag, "--import-cache");
}
