//! The cache flags (both spellings) parse into a build's exports, and bad values name the
//! flag as spelled. (`--output`, `-t` and `--push` are covered by `output_flags.rs`.)

use kiln_build::{ExportFlagError, ExportFlags};

fn err(flags: ExportFlags) -> ExportFlagError {
    match flags.parse() {
        Ok(_) => panic!("should fail"),
        Err(e) => e,
    }
}

#[test]
fn cache_flags_keep_their_own_names_in_errors() {
    let e = err(ExportFlags {
        cache_to: vec![("--cache-to".into(), "type=gha".into())],
        ..Default::default()
    });
    assert_eq!(e.flag(), "--cache-to");
    let e = err(ExportFlags {
        cache_from: vec![("--import-cache".into(), "type=gha".into())],
        ..Default::default()
    });
    assert_eq!(e.flag(), "--import-cache");
}
