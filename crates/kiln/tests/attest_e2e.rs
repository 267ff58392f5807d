//! Attestations and annotations end to end (root: real containers): an image pushed with
//! `--provenance mode=max --sbom true` is an OCI index holding the image and its attestation
//! manifest as BuildKit lays it out, read back with skopeo, the registry API, kiln itself
//! (`FROM` the pushed index) and podman; the same inputs give the same digests under
//! `SOURCE_DATE_EPOCH`; buildx's default provenance and its opt-outs; annotations at every
//! level of an OCI layout.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{get, get_json, require_root, skopeo_inspect, Fixture, TestRegistry};
use serde_json::Value;

const EPOCH: &str = "1700000000";

/// A dpkg status file shaped like Debian's (what `dpkg` writes), two installed packages and
/// one removed.
const DPKG_STATUS: &str = "Package: hello\nStatus: install ok installed\nPriority: optional\n\
Section: devel\nInstalled-Size: 281\nMaintainer: Santiago Vila <sanvila@debian.org>\n\
Architecture: amd64\nVersion: 2.10-3\nDepends: libc6 (>= 2.34)\nDescription: example package\n \
The GNU hello program.\n\n\
Package: tzdata\nStatus: install ok installed\nArchitecture: all\nVersion: 2024a-0+deb12u1\n\
Description: time zone data\n\n\
Package: gone\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1.0\n";

/// The lockfile `npm install is-number@7.0.0` writes (lockfile v3).
const NPM_LOCK: &str = r#"{
  "name": "app",
  "version": "1.0.0",
  "lockfileVersion": 3,
  "requires": true,
  "packages": {
    "": { "name": "app", "version": "1.0.0", "dependencies": { "is-number": "^7.0.0" } },
    "node_modules/is-number": {
      "version": "7.0.0",
      "resolved": "https://registry.npmjs.org/is-number/-/is-number-7.0.0.tgz",
      "license": "MIT",
      "engines": { "node": ">=0.12.0" }
    }
  }
}
"#;

/// A build context: busybox with a dpkg status file, an npm app and a build arg.
fn context(f: &Fixture) -> std::path::PathBuf {
    let ctx = f.path("attest-ctx");
    std::fs::create_dir_all(ctx.join("app/node_modules/is-number")).unwrap();
    std::fs::write(ctx.join("status"), DPKG_STATUS).unwrap();
    std::fs::write(ctx.join("app/package-lock.json"), NPM_LOCK).unwrap();
    std::fs::write(
        ctx.join("app/node_modules/is-number/package.json"),
        r#"{"name":"is-number","version":"7.0.0","license":"MIT"}"#,
    )
    .unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:latest\nARG GREETING=hi\nCOPY status /var/lib/dpkg/status\n\
COPY app/ /app/\nRUN echo \"$GREETING\" > /greeting\nCMD [\"cat\", \"/greeting\"]\n",
    )
    .unwrap();
    ctx
}

/// `kiln build CTX ARGS` in buildx's spelling with `SOURCE_DATE_EPOCH` and `env`.
fn build(f: &Fixture, ctx: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut all = vec!["build", ctx.to_str().unwrap(), "--progress", "plain"];
    all.extend(args);
    let mut env = env.to_vec();
    env.push(("SOURCE_DATE_EPOCH", EPOCH));
    f.kiln_env(&all, &env)
}

#[track_caller]
fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The exact bytes of a manifest in a registry, as skopeo reads them, and their digest.
fn raw_manifest(image: &str) -> (Vec<u8>, String) {
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo inspect --raw {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.stdout.clone(), sha256(&out.stdout))
}

fn sha256(bytes: &[u8]) -> String {
    let mut c = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = c.wait_with_output().unwrap();
    let hex = String::from_utf8_lossy(&out.stdout);
    format!("sha256:{}", hex.split_whitespace().next().unwrap())
}

fn metadata(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn a_push_with_provenance_and_sbom_is_an_index_with_an_attestation_manifest_in_kilns_registry() {
    require_root("a_push_with_provenance_and_sbom_is_an_index_with_an_attestation_manifest");
    a_push_with_provenance_and_sbom_is_an_index_with_an_attestation_manifest(TestRegistry::kiln());
}

#[test]
fn a_push_with_provenance_and_sbom_is_an_index_with_an_attestation_manifest_in_distribution() {
    require_root("a_push_with_provenance_and_sbom_is_an_index_with_an_attestation_manifest");
    a_push_with_provenance_and_sbom_is_an_index_with_an_attestation_manifest(
        TestRegistry::distribution(),
    );
}

fn a_push_with_provenance_and_sbom_is_an_index_with_an_attestation_manifest(reg: TestRegistry) {
    let image = format!("{}/att/app:1", reg.addr);
    let push = |f: &Fixture, meta: &str| {
        let ctx = context(f);
        let meta = f.path(meta);
        ok(&build(
            f,
            &ctx,
            &[
                "-t",
                &image,
                "--push",
                "--build-arg",
                "GREETING=hello-attested",
                "--provenance",
                "mode=max",
                "--sbom",
                "true",
                "--metadata-file",
                meta.to_str().unwrap(),
            ],
            &[],
        ));
        metadata(&meta)
    };
    let f = Fixture::new();
    let meta = push(&f, "meta.json");
    f.assert_store_clean("after an attested push");

    // The name points at an OCI index: the image, then its attestation manifest.
    let (raw, index_digest) = raw_manifest(&image);
    let index: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{index}"
    );
    assert_eq!(meta["containerimage.digest"], index_digest.as_str());
    assert_eq!(
        meta["containerimage.descriptor"]["digest"],
        index_digest.as_str()
    );
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{index}");
    let image_digest = entries[0]["digest"].as_str().unwrap().to_owned();
    assert_eq!(entries[0]["platform"]["os"], "linux");
    let att = &entries[1];
    assert_eq!(att["platform"]["os"], "unknown");
    assert_eq!(att["platform"]["architecture"], "unknown");
    assert_eq!(
        att["annotations"]["vnd.docker.reference.type"],
        "attestation-manifest"
    );
    assert_eq!(
        att["annotations"]["vnd.docker.reference.digest"],
        image_digest.as_str()
    );

    // The attestation manifest: one in-toto layer per statement, typed by annotation.
    let repo = format!("{}/att/app", reg.addr);
    let att_digest = att["digest"].as_str().unwrap();
    let (att_raw, att_check) = raw_manifest(&format!("{repo}@{att_digest}"));
    assert_eq!(att_check, att_digest);
    let att_manifest: Value = serde_json::from_slice(&att_raw).unwrap();
    let layers = att_manifest["layers"].as_array().unwrap();
    let types: Vec<&str> = layers
        .iter()
        .map(|l| {
            assert_eq!(l["mediaType"], "application/vnd.in-toto+json");
            l["annotations"]["in-toto.io/predicate-type"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        types,
        [
            "https://slsa.dev/provenance/v0.2",
            "https://spdx.dev/Document"
        ]
    );
    let blob = |d: &Value| {
        get_json(&format!(
            "http://{}/v2/att/app/blobs/{}",
            reg.addr,
            d["digest"].as_str().unwrap()
        ))
    };
    let provenance = blob(&layers[0]);
    let sbom = blob(&layers[1]);
    for statement in [&provenance, &sbom] {
        assert_eq!(statement["_type"], "https://in-toto.io/Statement/v0.1");
        assert_eq!(
            format!(
                "sha256:{}",
                statement["subject"][0]["digest"]["sha256"]
                    .as_str()
                    .unwrap()
            ),
            image_digest
        );
    }
    // mode=max: the build args' values and the steps (command lines) are in it.
    let p = &provenance["predicate"];
    assert_eq!(p["buildType"], "https://mobyproject.org/buildkit@v1");
    assert_eq!(
        p["invocation"]["parameters"]["args"]["build-arg:GREETING"],
        "hello-attested"
    );
    assert_eq!(p["invocation"]["parameters"]["frontend"], "dockerfile.v0");
    assert_eq!(p["invocation"]["configSource"]["entryPoint"], "Dockerfile");
    let steps = p["buildConfig"]["llbDefinition"].as_array().unwrap();
    assert!(
        steps
            .iter()
            .any(|s| s["op"].to_string().contains("/greeting")),
        "{steps:?}"
    );
    assert_eq!(p["metadata"]["buildStartedOn"], "2023-11-14T22:13:20Z");
    // The base image is a material, by digest; the subject is named after the image.
    assert!(
        p["materials"].as_array().unwrap().iter().any(|m| m["uri"]
            .as_str()
            .unwrap()
            .starts_with("pkg:docker/busybox@latest?")
            && m["digest"]["sha256"].is_string()),
        "{}",
        p["materials"]
    );
    assert_eq!(
        provenance["subject"][0]["name"],
        format!("pkg:docker/{}/att/app@1?platform=linux%2Famd64", reg.addr)
    );
    // The SBOM lists the image's dpkg and npm packages (and no removed package).
    let purls: Vec<String> = sbom["predicate"]["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["externalRefs"][0]["referenceLocator"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for want in [
        "pkg:deb/debian/hello@2.10-3?arch=amd64",
        "pkg:deb/debian/tzdata@2024a-0%2Bdeb12u1?arch=all",
        "pkg:npm/is-number@7.0.0",
    ] {
        assert!(purls.iter().any(|p| p == want), "{want} not in {purls:?}");
    }
    assert!(!purls.iter().any(|p| p.contains("/gone@")), "{purls:?}");
    assert_eq!(sbom["predicate"]["spdxVersion"], "SPDX-2.3");

    // skopeo reads the image through the index (the platform entry, not the attestation).
    let inspected = skopeo_inspect(&image, &[]);
    assert_eq!(inspected["Os"], "linux");

    // kiln's own client resolves the index to the image: a build FROM it.
    let from = f.path("from-ctx");
    std::fs::create_dir_all(&from).unwrap();
    std::fs::write(
        from.join("Dockerfile"),
        format!("FROM {image}\nRUN cat /greeting > /seen\n"),
    )
    .unwrap();
    let out_dir = f.path("from-out");
    ok(&build(
        &f,
        &from,
        &[
            "--pull",
            "-o",
            &format!("type=local,dest={}", out_dir.display()),
        ],
        &[],
    ));
    assert_eq!(
        std::fs::read_to_string(out_dir.join("seen")).unwrap(),
        "hello-attested\n"
    );

    // podman runs the pushed index.
    let conf = common::podman_conf();
    let run = Command::new("podman")
        .args([
            "run",
            "--rm",
            "--network=none",
            "--tls-verify=false",
            &image,
        ])
        .env("CONTAINERS_CONF", &conf)
        .output()
        .unwrap();
    let _ = Command::new("podman")
        .args(["rmi", "-f", &image])
        .env("CONTAINERS_CONF", &conf)
        .output();
    assert!(
        run.status.success(),
        "podman run {image}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&run.stdout), "hello-attested\n");

    // A fresh runner with the same inputs and SOURCE_DATE_EPOCH pushes the same bytes.
    let again = push(&Fixture::new(), "meta2.json");
    assert_eq!(
        again["containerimage.digest"],
        meta["containerimage.digest"]
    );
    assert_eq!(raw_manifest(&image).1, index_digest);
}

#[test]
fn buildx_default_provenance_on_push_and_its_opt_outs() {
    require_root("buildx_default_provenance_on_push_and_its_opt_outs");
    let reg = TestRegistry::kiln();
    let f = Fixture::new();
    let ctx = context(&f);
    let top = |tag: &str| -> Value {
        let (raw, _) = raw_manifest(&format!("{}/dflt/app:{tag}", reg.addr));
        serde_json::from_slice(&raw).unwrap()
    };
    let name = |tag: &str| format!("{}/dflt/app:{tag}", reg.addr);

    // `--push`: a mode=min provenance, without the build args' values.
    let secret_arg = "GREETING=not-in-min-provenance";
    ok(&build(
        &f,
        &ctx,
        &["-t", &name("min"), "--push", "--build-arg", secret_arg],
        &[],
    ));
    let index = top("min");
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2, "{index}");
    let att = index["manifests"][1]["digest"].as_str().unwrap();
    let (att_raw, _) = raw_manifest(&format!("{}/dflt/app@{att}", reg.addr));
    let att: Value = serde_json::from_slice(&att_raw).unwrap();
    assert_eq!(att["layers"].as_array().unwrap().len(), 1);
    let statement = get(&format!(
        "http://{}/v2/dflt/app/blobs/{}",
        reg.addr,
        att["layers"][0]["digest"].as_str().unwrap()
    ));
    let statement = String::from_utf8_lossy(&statement);
    assert!(statement.contains("https://slsa.dev/provenance/v0.2"));
    assert!(!statement.contains("not-in-min-provenance"), "{statement}");
    assert!(!statement.contains("buildConfig"), "{statement}");

    // `type=registry` is buildx's push too; attestations turn OCI media types on, as
    // BuildKit does.
    ok(&build(
        &f,
        &ctx,
        &[
            "-o",
            &format!("type=registry,name={},oci-mediatypes=false", name("reg")),
        ],
        &[],
    ));
    let index = top("reg");
    assert_eq!(
        index["manifests"][0]["mediaType"], "application/vnd.oci.image.manifest.v1+json",
        "{index}"
    );
    // Turned off: a plain image manifest, as before attestations existed.
    ok(&build(
        &f,
        &ctx,
        &["-t", &name("off"), "--push", "--provenance=false"],
        &[],
    ));
    assert_eq!(
        top("off")["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    ok(&build(
        &f,
        &ctx,
        &["-t", &name("env"), "--push"],
        &[("BUILDX_NO_DEFAULT_ATTESTATIONS", "1")],
    ));
    assert_eq!(
        top("env")["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    // buildctl's spelling (`type=image,push=true`): no default, as buildctl.
    ok(&build(
        &f,
        &ctx,
        &["-o", &format!("type=image,name={},push=true", name("ctl"))],
        &[],
    ));
    assert_eq!(
        top("ctl")["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    // ... and buildctl's own attestation option.
    ok(&build(
        &f,
        &ctx,
        &[
            "-o",
            &format!("type=image,name={},push=true", name("opt")),
            "--opt",
            "attest:sbom=",
        ],
        &[],
    ));
    assert_eq!(top("opt")["manifests"].as_array().unwrap().len(), 2);
    // A Docker archive has no room for attestations: the build says so and goes on.
    let tar = f.path("docker.tar");
    let out = build(
        &f,
        &ctx,
        &[
            "-o",
            &format!("type=docker,dest={}", tar.display()),
            "--sbom=true",
        ],
        &[],
    );
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("attached to image, registry and oci outputs only"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads a blob of an extracted OCI layout as JSON.
fn layout_blob(dir: &Path, digest: &str) -> Value {
    let path = dir.join("blobs/sha256").join(&digest["sha256:".len()..]);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn annotations_reach_every_level_of_an_oci_layout_with_its_sbom() {
    require_root("annotations_reach_every_level_of_an_oci_layout_with_its_sbom");
    let f = Fixture::new();
    let ctx = context(&f);
    let tar = f.path("app.tar");
    ok(&build(
        &f,
        &ctx,
        &[
            "-o",
            &format!(
                "type=oci,dest={},name=app:1,annotation-index.org.example.from-output=o",
                tar.display()
            ),
            "--annotation",
            "org.opencontainers.image.source=https://example.com/app",
            "--annotation",
            "index:org.example.index=i",
            "--annotation",
            "manifest-descriptor:org.example.desc=d",
            "--annotation",
            "index-descriptor:org.example.top=t",
            "--annotation",
            "manifest[linux/s390x]:org.example.other-platform=x",
            "--sbom=true",
        ],
        &[],
    ));
    let x = f.path("app-layout");
    std::fs::create_dir_all(&x).unwrap();
    assert!(Command::new("tar")
        .arg("xf")
        .arg(&tar)
        .arg("-C")
        .arg(&x)
        .status()
        .unwrap()
        .success());
    let layout: Value =
        serde_json::from_slice(&std::fs::read(x.join("index.json")).unwrap()).unwrap();
    let top = &layout["manifests"][0];
    assert_eq!(top["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert_eq!(top["annotations"]["org.example.top"], "t");
    let index = layout_blob(&x, top["digest"].as_str().unwrap());
    assert_eq!(index["annotations"]["org.example.index"], "i");
    assert_eq!(index["annotations"]["org.example.from-output"], "o");
    let entry = &index["manifests"][0];
    assert_eq!(entry["annotations"]["org.example.desc"], "d");
    let manifest = layout_blob(&x, entry["digest"].as_str().unwrap());
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.source"],
        "https://example.com/app"
    );
    assert!(manifest["annotations"]
        .get("org.example.other-platform")
        .is_none());
    // The SBOM travels in the layout too.
    let att = layout_blob(&x, index["manifests"][1]["digest"].as_str().unwrap());
    assert_eq!(
        att["layers"][0]["annotations"]["in-toto.io/predicate-type"],
        "https://spdx.dev/Document"
    );
}

#[test]
fn bad_attestation_and_annotation_flags_name_the_flag() {
    let f = tempfile::tempdir().unwrap();
    std::fs::write(f.path().join("Dockerfile"), "FROM scratch\n").unwrap();
    let kiln = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--root")
            .arg(f.path().join("state"))
            .arg("build")
            .arg(f.path())
            .args(args)
            .output()
            .unwrap()
    };
    for (args, flag) in [
        (vec!["--attest", "type=vex"], "--attest"),
        (vec!["--provenance", "mode=most"], "--provenance"),
        (vec!["--sbom", "colour=red"], "--sbom"),
        (vec!["--annotation", "layer:k=v"], "--annotation"),
        (vec!["--opt", "attest:provenance=mode=most"], "--opt"),
    ] {
        let out = kiln(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}
