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

/// The one cache flag value of `flags`, made into its export or import.
fn exports(flags: ExportFlags) -> kiln_build::Exports {
    flags.parse().unwrap_or_else(|e| panic!("{e}"))
}

fn cache_to(flag: &str, value: &str) -> kiln_build::cache::CacheExport {
    let mut e = exports(ExportFlags {
        cache_to: vec![(flag.into(), value.into())],
        ..Default::default()
    });
    assert_eq!(e.cache_exports.len(), 1);
    e.cache_exports.remove(0)
}

fn cache_from(flag: &str, value: &str) -> kiln_build::cache::CacheImport {
    let mut e = exports(ExportFlags {
        cache_from: vec![(flag.into(), value.into())],
        ..Default::default()
    });
    assert_eq!(e.cache_imports.len(), 1);
    e.cache_imports.remove(0)
}

#[test]
fn cache_export_and_import_specs_parse() {
    let all = "type=registry,ref=reg/app:cache,mode=max,compression=zstd,compression-level=5,force-compression=true,ignore-error=true,oci-mediatypes=true,image-manifest=true,cache-mounts=true";
    let e = cache_to("--export-cache", all);
    assert_eq!(e.backend.name(), "reg/app:cache");
    let (kind, attrs) = kiln_build::parse_attrs("--export-cache", all).expect("valid");
    assert_eq!(kind, "registry");
    let r = kiln_build::cache::RegistryCache::from_attrs(&attrs, "--export-cache").expect("valid");
    assert!(r.scope().max && r.scope().cache_mounts);
    assert_eq!(r.scope().unapplied_compression, Some("compression=zstd"));
    assert!(e.ignore_error);

    let (_, attrs) = kiln_build::parse_attrs("--cache-to", "type=local,dest=/tmp/c").expect("ok");
    let l = kiln_build::cache::LocalCache::from_attrs(&attrs, "--cache-to").expect("valid");
    assert!(!l.scope().max);
    assert_eq!(
        cache_to("--cache-to", "type=local,dest=/tmp/c")
            .backend
            .name(),
        "/tmp/c"
    );
    assert_eq!(
        cache_to("--cache-to", "type=inline").backend.name(),
        "inline"
    );
    let bare = cache_to("--cache-to", "reg/app:cache");
    assert_eq!(bare.backend.name(), "reg/app:cache");
    assert!(!bare.ignore_error);

    let i = cache_from("--import-cache", "type=registry,ref=reg/app:cache");
    assert!(i.ignore_error);
    assert_eq!(
        cache_from("--cache-from", "type=local,src=/c")
            .backend
            .name(),
        "/c"
    );
    assert_eq!(
        cache_from("--cache-from", "reg/app:cache").backend.name(),
        "reg/app:cache"
    );
}

#[test]
fn cache_spec_errors_name_the_flag() {
    let spec_error = |e: ExportFlagError| match e {
        ExportFlagError::Cache(s) => s,
        other => panic!("not a bad value: {other}"),
    };
    for (flag, v, needle) in [
        ("--export-cache", "type=registry", "needs ref=REF"),
        (
            "--export-cache",
            "type=registry,ref=x,mode=all",
            "mode=`all`",
        ),
        (
            "--cache-to",
            "type=azblob,name=b",
            "unsupported cache type `azblob`",
        ),
        ("--cache-to", "type=local,src=/x", "unknown key `src`"),
        ("--cache-to", "type=local", "needs dest=DIR"),
    ] {
        let e = spec_error(err(ExportFlags {
            cache_to: vec![(flag.into(), v.into())],
            ..Default::default()
        }));
        assert_eq!((e.flag.as_str(), e.value.as_str()), (flag, v));
        assert!(e.reason.contains(needle), "{v}: {}", e.reason);
    }
    let import = |flag: &str, v: &str| {
        spec_error(err(ExportFlags {
            cache_from: vec![(flag.into(), v.into())],
            ..Default::default()
        }))
    };
    assert!(import("--import-cache", "type=inline")
        .reason
        .contains("export-only"));
    assert!(import("--cache-from", "type=local")
        .reason
        .contains("needs src=DIR"));
}

#[test]
fn cache_booleans_take_one_and_zero_and_a_bare_key() {
    for (value, want) in [("1", true), ("", true), ("true", true), ("0", false)] {
        let e = cache_to(
            "--cache-to",
            &format!("type=registry,ref=reg/app:cache,ignore-error={value}"),
        );
        assert_eq!(e.ignore_error, want, "ignore-error={value}");
    }
    let bad = err(ExportFlags {
        cache_to: vec![(
            "--cache-to".into(),
            "type=registry,ref=reg/app:cache,ignore-error=maybe".into(),
        )],
        ..Default::default()
    });
    assert!(bad.to_string().contains("expected true or false"), "{bad}");
}

/// Cache layers are the build's own gzip blobs: a compression the export would not apply is
/// kept to be said as a warning, and gzip (what is exported) is not.
#[test]
fn a_cache_compression_the_export_does_not_apply_is_kept_for_a_warning() {
    let scope = |value: &str| {
        let (_, attrs) = kiln_build::parse_attrs("--cache-to", value).expect("valid");
        kiln_build::cache::RegistryCache::from_attrs(&attrs, "--cache-to")
            .expect("valid")
            .scope()
            .unapplied_compression
    };
    assert_eq!(scope("type=registry,ref=r/a:c"), None);
    assert_eq!(scope("type=registry,ref=r/a:c,compression=gzip"), None);
    assert_eq!(
        scope("type=registry,ref=r/a:c,compression=uncompressed"),
        Some("compression=uncompressed")
    );
    assert_eq!(
        scope("type=registry,ref=r/a:c,compression=gzip,compression-level=9"),
        Some("compression-level")
    );
    assert_eq!(
        scope("type=registry,ref=r/a:c,force-compression=true"),
        Some("force-compression=true")
    );
    assert_eq!(
        scope("type=registry,ref=r/a:c,force-compression=false"),
        None
    );
}
