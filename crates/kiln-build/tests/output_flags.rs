//! `--output`/`-o`, `-t` and `--push` select exporters; bad values name the flag and the value.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kiln_build::export::{
    exporters_from_flags, output_attrs, parse_output, Attrs, DockerExporter, ImageExporter,
    LocalExporter, OciExporter, OutputRequest,
};
use kiln_build::spec::SpecError;
use kiln_oci::compression::Compression;

/// The value of one `--output` parsed as `kind`'s own attributes.
fn image(flag: &str, value: &str) -> ImageExporter {
    let (kind, attrs) = output_attrs(flag, value).unwrap();
    ImageExporter::from_attrs(&Attrs::new(&kind, &attrs, flag)).unwrap()
}

fn kind(flag: &str, value: &str) -> String {
    parse_output(flag, value).unwrap().kind().to_owned()
}

fn err(outputs: &[&str], tags: &[&str], push: bool) -> SpecError {
    let outputs: Vec<String> = outputs.iter().map(|o| o.to_string()).collect();
    let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    match exporters_from_flags(&outputs, &tags, push) {
        Ok(_) => panic!("should fail"),
        Err(e) => e,
    }
}

#[test]
fn output_types_parse_with_their_keys() {
    let o = image("--output", "type=image,name=reg.local:5000/app:1,push=true,oci-mediatypes=false,compression=zstd,compression-level=3,force-compression=true,registry.insecure=true");
    assert_eq!(kind("--output", "type=image,name=reg.local:5000/app:1,push=true,oci-mediatypes=false,compression=zstd,compression-level=3,force-compression=true,registry.insecure=true"), "image");
    assert_eq!(o.names, ["reg.local:5000/app:1"]);
    assert!(o.push && o.force_compression && o.registry_insecure);
    assert_eq!(
        (o.oci_mediatypes, o.compression, o.compression_level),
        (Some(false), Some(Compression::Zstd), Some(3))
    );
    let r = image("--output", "type=registry,\"name=a/b:1,a/b:2\"");
    assert_eq!(
        (
            kind("--output", "type=registry,\"name=a/b:1,a/b:2\""),
            r.push,
            r.names.len()
        ),
        ("registry".to_owned(), true, 2)
    );
    let (k, attrs) = output_attrs("-o", "type=oci,dest=out.tar").unwrap();
    assert_eq!(
        OciExporter::from_attrs(&Attrs::new(&k, &attrs, "-o"))
            .unwrap()
            .settings
            .dest,
        PathBuf::from("out.tar")
    );
    let (k, attrs) = output_attrs("-o", "type=docker,dest=d.tar,name=x").unwrap();
    assert!(DockerExporter::from_attrs(&Attrs::new(&k, &attrs, "-o")).is_ok());
    assert_eq!(kind("-o", "type=docker,dest=d.tar,name=x"), "docker");
    assert_eq!(kind("-o", "type=local,dest=out"), "local");
    assert_eq!(kind("-o", "type=tar,dest=-"), "tar");
    assert_eq!(kind("-o", "type=cacheonly"), "cacheonly");
    // buildx shorthands.
    let (k, attrs) = output_attrs("-o", "./out").unwrap();
    let d = LocalExporter::from_attrs(&Attrs::new(&k, &attrs, "-o")).unwrap();
    assert_eq!((k.as_str(), d.dest), ("local", PathBuf::from("./out")));
    assert_eq!(kind("-o", "-"), "tar");
}

#[test]
fn output_errors_name_the_problem() {
    for (v, needle) in [
        ("type=zip", "unknown output type `zip`"),
        ("type=local", "needs dest=PATH"),
        ("type=image,dest=x", "unknown key `dest` for type=image"),
        ("type=image,compression=lz4", "compression `lz4`"),
        ("type=image,compression-level=99", "compression-level `99`"),
        ("type=image,push=maybe", "push=`maybe`"),
        ("type=image,\"name=x", "unterminated double quote"),
        ("", "expected type=KIND"),
    ] {
        let e = match parse_output("--output", v) {
            Ok(_) => panic!("{v}: should fail"),
            Err(e) => e,
        };
        assert_eq!(e.flag, "--output");
        assert_eq!(e.value, v);
        assert!(e.reason.contains(needle), "{v}: {}", e.reason);
    }
}

#[test]
fn tags_and_push_become_a_registry_output() {
    let tags = vec!["r/app:1".to_owned(), "r/app:latest".to_owned()];
    let e = exporters_from_flags(&[], &tags, true).unwrap();
    assert_eq!(e.len(), 1);
    let r = OutputRequest::from_tags(&tags, true).unwrap();
    let o = ImageExporter::from_attrs(&Attrs::new(&r.kind, &r.attrs, &r.flag)).unwrap();
    assert_eq!((e[0].kind(), o.push), ("registry", true));
    assert_eq!(o.names, ["r/app:1", "r/app:latest"]);
    let tags = vec!["r/app:1".to_owned()];
    let r = OutputRequest::from_flag("--output", "type=image", &tags, false).unwrap();
    let o = ImageExporter::from_attrs(&Attrs::new(&r.kind, &r.attrs, &r.flag)).unwrap();
    assert_eq!((o.names.len(), o.push), (1, false));
    assert_eq!(err(&[], &[], true).flag, "--push");
    assert_eq!(err(&[], &["bad tag"], false).flag, "--tag");
}

#[test]
fn push_flag_pushes_image_outputs_and_keeps_their_names() {
    let tags = vec!["r/app:1".to_owned()];
    let r = OutputRequest::from_flag("-o", "type=image,name=r/own:2", &tags, true).unwrap();
    let o = ImageExporter::from_attrs(&Attrs::new(&r.kind, &r.attrs, &r.flag)).unwrap();
    assert_eq!(
        (o.names.as_slice(), o.push),
        (&["r/own:2".to_owned()][..], true)
    );
    // --push only concerns image outputs: beside a local output it asks nothing more.
    let outputs = ["type=local,dest=out".to_owned()];
    assert_eq!(exporters_from_flags(&outputs, &[], true).unwrap().len(), 1);
    // A bad push= value is reported as such even with --push.
    let e = err(&["type=image,name=r/a:1,push=maybe"], &[], true);
    assert!(e.reason.contains("push=`maybe`"), "{}", e.reason);
}

#[test]
fn exporter_table_knows_every_type_and_only_those() {
    let dest = BTreeMap::from([("dest".to_owned(), "out".to_owned())]);
    for (k, attrs, image) in [
        ("image", BTreeMap::new(), true),
        ("registry", BTreeMap::new(), true),
        ("oci", dest.clone(), true),
        ("docker", dest.clone(), true),
        // `--load`: the docker archive into the local image store.
        ("docker", BTreeMap::new(), true),
        ("local", dest.clone(), false),
        ("tar", dest.clone(), false),
        ("cacheonly", BTreeMap::new(), false),
    ] {
        let e = kiln_build::export::exporter_from_attrs(k, &attrs, "--output").unwrap();
        assert_eq!((e.kind(), e.makes_image()), (k, image));
    }
    let e = match kiln_build::export::exporter_from_attrs("zip", &dest, "--output") {
        Ok(_) => panic!("zip is no exporter"),
        Err(e) => e,
    };
    assert!(
        e.reason.contains("unknown output type `zip`"),
        "{}",
        e.reason
    );
}

#[test]
fn compression_and_insecure_names_reach_the_build() {
    let e = parse_output(
        "-o",
        "type=image,name=r.local/a:1,compression=zstd,registry.insecure=true",
    )
    .unwrap();
    assert_eq!(e.layer_compression(), Some(Compression::Zstd));
    assert_eq!(e.insecure_names(), ["r.local/a:1"]);
    let e = parse_output("-o", "type=image,name=r.local/a:1").unwrap();
    assert!(e.insecure_names().is_empty());
    assert_eq!(parse_output("-o", "out").unwrap().layer_compression(), None);
}

#[test]
fn load_is_a_docker_output_without_dest_named_by_the_tags() {
    let tags = vec!["r/app:1".to_owned(), "r/app:latest".to_owned()];
    let r = OutputRequest::from_flag("--output", "type=docker", &tags, false).unwrap();
    assert_eq!(
        r.attrs.get("name").map(String::as_str),
        Some("r/app:1,r/app:latest")
    );
    let e = kiln_build::export::LoadExporter::from_attrs(&Attrs::new(&r.kind, &r.attrs, &r.flag))
        .unwrap();
    assert_eq!(e.settings.names, tags);
    assert_eq!(e.context, None);
    // An output's own name is kept; `context=` is the load's own attribute.
    let r =
        OutputRequest::from_flag("-o", "type=docker,name=own:2,context=ci", &tags, false).unwrap();
    let e = kiln_build::export::LoadExporter::from_attrs(&Attrs::new(&r.kind, &r.attrs, &r.flag))
        .unwrap();
    assert_eq!(
        (e.settings.names.as_slice(), e.context.as_deref()),
        (&["own:2".to_owned()][..], Some("ci"))
    );
    // An unknown key is still an error naming the flag.
    let e = err(&["type=docker,colour=blue"], &[], false);
    assert!(e.reason.contains("unknown key `colour`"), "{}", e.reason);
}

#[test]
fn load_adds_one_docker_output_and_keeps_the_push() {
    use kiln_build::export::outputs_with_load;
    let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(outputs_with_load(&[], false), strs(&["type=docker"]));
    // --push --load -t r/app:1: pushed and loaded.
    let outputs = outputs_with_load(&[], true);
    assert_eq!(outputs, strs(&["type=registry", "type=docker"]));
    let tags = strs(&["r/app:1"]);
    let kinds: Vec<String> = exporters_from_flags(&outputs, &tags, true)
        .unwrap()
        .iter()
        .map(|e| e.kind().to_owned())
        .collect();
    assert_eq!(kinds, ["registry", "docker"]);
    // An output that already loads is not doubled; a docker file is no load.
    let given = strs(&["type=docker,name=a:1"]);
    assert_eq!(outputs_with_load(&given, false), given);
    let file = strs(&["type=docker,dest=a.tar"]);
    assert_eq!(
        outputs_with_load(&file, false),
        strs(&["type=docker,dest=a.tar", "type=docker"])
    );
}

#[test]
fn several_platforms_are_refused_for_docker_outputs_with_buildx_message() {
    use kiln_build::export::refuse_manifest_list;
    let load = exporters_from_flags(&["type=docker".to_owned()], &[], false).unwrap();
    let text = refuse_manifest_list(&load, 2).unwrap_err().to_string();
    assert!(
        text.starts_with("docker exporter does not currently support exporting manifest lists"),
        "{text}"
    );
    assert!(refuse_manifest_list(&load, 1).is_ok());
    let oci = exporters_from_flags(&["type=oci,dest=o.tar".to_owned()], &[], false).unwrap();
    assert!(refuse_manifest_list(&oci, 2).is_ok());
}
