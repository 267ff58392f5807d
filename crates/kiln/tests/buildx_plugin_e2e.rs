//! kiln as the docker CLI's buildx plugin, driven through Debian's docker CLI
//! (`/usr/bin/docker`, docker.io 20.10) with a temporary `DOCKER_CONFIG`, against kiln's
//! registry: the commands docker/setup-buildx-action runs (`version`, `create`,
//! `inspect --bootstrap`, `ls`, `rm`, `install`), the `docker buildx build` line
//! docker/build-push-action generates for `push: true` (tags, labels, build args, a secret,
//! registry cache, `provenance: mode=max`, `sbom: true`, `--metadata-file`, `--iidfile`), the
//! attestations read back with `imagetools inspect`, the image checked with skopeo and run
//! with podman; `docker build` through the `builder` alias; `imagetools create`.
//! Needs root, docker.io, skopeo and podman (.ci/install); a check that cannot run fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// Debian's docker CLI (docker.io); other `docker` binaries on PATH are not what is tested.
const DOCKER: &str = "/usr/bin/docker";

/// A docker CLI whose config (and so plugin directory) is a temp dir, with kiln installed in
/// it as `docker-buildx` by `kiln install-plugin`, and a state dir of its own (a CI runner).
struct DockerCli {
    config: PathBuf,
    state: PathBuf,
}

impl DockerCli {
    fn install(f: &Fixture, name: &str) -> Self {
        assert!(
            Path::new(DOCKER).exists(),
            "{DOCKER} is missing: install Debian's docker.io (.ci/install)"
        );
        let cli = DockerCli {
            config: f.path(&format!("{name}-docker-config")),
            state: f.path(&format!("{name}-state")),
        };
        // The default directory: $DOCKER_CONFIG/cli-plugins.
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("install-plugin")
            .env("DOCKER_CONFIG", &cli.config)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "kiln install-plugin: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let link = cli.config.join("cli-plugins/docker-buildx");
        assert!(said.contains(&link.display().to_string()), "{said}");
        assert_eq!(
            std::fs::canonicalize(&link).unwrap(),
            std::fs::canonicalize(env!("CARGO_BIN_EXE_kiln")).unwrap()
        );
        // Installing again changes nothing and says so.
        let again = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("install-plugin")
            .env("DOCKER_CONFIG", &cli.config)
            .output()
            .unwrap();
        assert!(again.status.success());
        assert!(String::from_utf8_lossy(&again.stdout).contains("already points at"));
        cli
    }

    fn run(&self, args: &[&str], cwd: &Path) -> Output {
        Command::new(DOCKER)
            .args(args)
            .current_dir(cwd)
            .env("DOCKER_CONFIG", &self.config)
            .env("KILN_ROOT", &self.state)
            .env_remove("BUILDX_BUILDER")
            .env_remove("BUILDX_CONFIG")
            .output()
            .unwrap()
    }

    /// Runs `docker ARGS` and returns its stdout; fails the test with its stderr if it fails.
    fn ok(&self, args: &[&str], cwd: &Path) -> String {
        let out = self.run(args, cwd);
        assert!(
            out.status.success(),
            "docker {}:\n{}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// `key: value` lines as docker/actions-toolkit's `Builder.parseInspect` reads them: the first
/// `Name` is the builder's, later ones start nodes.
fn inspect_fields(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
        .collect()
}

fn field<'a>(fields: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    fields
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn setup_buildx_action_steps_work_through_the_docker_cli() {
    require_root("builds run RUN steps in containers");
    let f = Fixture::new();
    let docker = DockerCli::install(&f, "setup");
    let cwd = f.path("app");

    // The docker CLI lists kiln as its buildx plugin (from docker-cli-plugin-metadata).
    let meta = Command::new(docker.config.join("cli-plugins/docker-buildx"))
        .arg("docker-cli-plugin-metadata")
        .output()
        .unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&meta.stdout).unwrap();
    assert_eq!(meta["SchemaVersion"], "0.1.0");
    assert_eq!(meta["Vendor"], "kiln");
    let help = docker.ok(&["--help"], &cwd);
    // A `docker-buildx` that is not kiln (Docker's own) stays unless --force is given.
    let foreign = f.path("foreign/cli-plugins");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(
        foreign.join("docker-buildx"),
        "#!/bin/sh\necho docker buildx\n",
    )
    .unwrap();
    let install_in = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["install-plugin", "--dir", foreign.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = install_in(&[]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
    assert!(install_in(&["--force"]).status.success());
    assert_eq!(
        std::fs::canonicalize(foreign.join("docker-buildx")).unwrap(),
        std::fs::canonicalize(env!("CARGO_BIN_EXE_kiln")).unwrap()
    );
    assert!(
        help.contains("buildx*"),
        "docker --help lists the plugin:\n{help}"
    );

    // A bare `docker buildx` succeeds: actions-toolkit's `isAvailable` (else the action
    // downloads Docker's buildx over the plugin).
    let bare = docker.ok(&["buildx"], &cwd);
    assert!(bare.contains("imagetools"), "{bare}");

    // `docker buildx version`: actions-toolkit takes the first ` vX.Y.Z` of the line.
    let version = docker.ok(&["buildx", "version"], &cwd);
    let v = version
        .split_whitespace()
        .nth(1)
        .and_then(|w| w.strip_prefix('v'))
        .unwrap_or_default()
        .to_owned();
    assert!(version.starts_with("kiln "), "{version}");
    let parts: Vec<u32> = v.split('.').map(|p| p.parse().unwrap()).collect();
    assert!(
        parts.len() == 3 && (parts[0], parts[1]) >= (0, 15),
        "a buildx release new enough for build-push-action's flags: {version}"
    );

    // The same commands without the docker CLI: `kiln buildx ...`.
    let direct = f.kiln(&["buildx", "version"]);
    assert_eq!(String::from_utf8_lossy(&direct.stdout), version);

    // setup-buildx-action: create, boot, inspect by name.
    let name = "builder-5c1f0a5e-0d4e-4a4e-9a57-2f4d1a8e7c11";
    let created = docker.ok(
        &[
            "buildx",
            "create",
            "--name",
            name,
            "--driver",
            "docker-container",
            "--buildkitd-flags",
            "--allow-insecure-entitlement security.insecure --allow-insecure-entitlement network.host",
            "--use",
        ],
        &cwd,
    );
    assert_eq!(created.trim(), name);
    let booted = docker.ok(
        &["buildx", "inspect", "--bootstrap", "--builder", name],
        &cwd,
    );
    assert!(
        docker.state.join("db").is_dir(),
        "bootstrap opened the state dir"
    );
    let fields = inspect_fields(&booted);
    assert_eq!(field(&fields, "name"), [name, &format!("{name}0")]);
    assert_eq!(field(&fields, "driver"), ["kiln"]);
    assert_eq!(field(&fields, "status"), ["running"]);
    let bk = field(&fields, "buildkit version")[0];
    assert!(bk.starts_with("v0."), "{booted}");
    assert!(
        field(&fields, "platforms")[0].contains("linux/"),
        "{booted}"
    );
    assert_eq!(
        field(&fields, "buildkit daemon flags"),
        ["--allow-insecure-entitlement security.insecure --allow-insecure-entitlement network.host"]
    );
    // The current builder without a name, and `default` as buildx's docker builder.
    let current = docker.ok(&["buildx", "inspect"], &cwd);
    assert!(
        current.starts_with(&format!("Name:   {name}\n")),
        "{current}"
    );
    docker.ok(&["buildx", "inspect", "default"], &cwd);
    // build-push-action inspects the builder its `builder` input names, empty when unset.
    let unnamed = docker.ok(&["buildx", "inspect", ""], &cwd);
    assert!(
        unnamed.starts_with(&format!("Name:   {name}\n")),
        "{unnamed}"
    );
    let ls = docker.ok(&["buildx", "ls"], &cwd);
    assert!(ls.contains(&format!("{name}*")), "{ls}");
    assert!(ls.lines().any(|l| l.starts_with("kiln ")), "{ls}");
    let json_ls = docker.ok(&["buildx", "ls", "--format", "json"], &cwd);
    let current: Vec<serde_json::Value> = json_ls
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|b: &serde_json::Value| b["Current"] == true)
        .collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0]["Name"], name);

    // An unknown builder is an error naming it, as buildx's.
    let missing = docker.run(&["buildx", "inspect", "nosuch"], &cwd);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("\"nosuch\""));

    // `docker buildx use`, `du`, `prune -f`, then the post step's `rm`.
    docker.ok(&["buildx", "use", "kiln"], &cwd);
    assert!(docker.ok(&["buildx", "ls"], &cwd).contains("kiln*"));
    let du = docker.ok(&["buildx", "du"], &cwd);
    assert!(du.contains("cache records"), "{du}");
    // Without -f, prune asks; no answer (stdin closed) is "no".
    let asked = docker.run(&["buildx", "prune"], &cwd);
    assert!(asked.status.success());
    assert!(String::from_utf8_lossy(&asked.stderr).contains("[y/N]"));
    assert!(asked.stdout.is_empty(), "nothing pruned without an answer");
    let pruned = docker.ok(&["buildx", "prune", "-f", "--all"], &cwd);
    assert!(pruned.starts_with("removed "), "{pruned}");
    docker.ok(&["buildx", "rm", name], &cwd);
    assert!(!docker.ok(&["buildx", "ls"], &cwd).contains(name));
    let builtin = docker.run(&["buildx", "rm", "kiln"], &cwd);
    assert!(!builtin.status.success(), "kiln's own builder stays");

    // `install: true`: the `builder` alias in config.json, every other key kept.
    std::fs::write(
        docker.config.join("config.json"),
        "{\"auths\": {}, \"psFormat\": \"{{.ID}}\"}",
    )
    .unwrap();
    docker.ok(&["buildx", "install"], &cwd);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(docker.config.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["aliases"]["builder"], "buildx");
    assert_eq!(config["psFormat"], "{{.ID}}");
    docker.ok(&["buildx", "uninstall"], &cwd);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(docker.config.join("config.json")).unwrap()).unwrap();
    assert!(config.get("aliases").is_none(), "{config}");
    assert_eq!(config["psFormat"], "{{.ID}}");
}

/// The example of the must-show build: a build arg, a secret used by a RUN step (never
/// stored; the Dockerfile names only its prefix, so its value in a log would be a leak), a
/// dpkg status database for the SBOM to find.
const DOCKERFILE: &str = r#"ARG BASE
FROM $BASE
ARG GREETING
RUN --mount=type=secret,id=GIT_AUTH_TOKEN \
    grep -q '^tok-' /run/secrets/GIT_AUTH_TOKEN && echo secret-seen > /secret-check
RUN mkdir -p /var/lib/dpkg && printf 'Package: kiln-test-pkg\nStatus: install ok installed\nPriority: optional\nArchitecture: amd64\nVersion: 1.2.3-4\nDescription: a package for the SBOM\n\n' > /var/lib/dpkg/status \
    && echo "$GREETING from kiln" > /greeting
CMD ["sh", "-c", "cat /greeting /secret-check; test -e /run/secrets/GIT_AUTH_TOKEN || echo no-secret-file"]
"#;

#[test]
fn build_push_action_push_with_cache_provenance_and_sbom() {
    require_root("builds run RUN steps in containers");
    require_program("skopeo");
    let f = Fixture::new();
    let reg = TestRegistry::kiln();
    let base = f.push_base(&reg);
    let docker = DockerCli::install(&f, "bpa");
    let ctx = f.path("bpa-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE).unwrap();
    // What build-push-action writes into its temp dir: the secret file, then reads back the
    // metadata file and the image id file.
    let tmp = f.path("bpa-tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let secret = tmp.join("tmp-1234-abcd");
    std::fs::write(&secret, "tok-3f9c2e").unwrap();
    let iidfile = tmp.join("build-iidfile-0123456789.txt");
    let metadata = tmp.join("build-metadata-0123456789.json");
    let image = format!("{}/kiln-e2e/app", reg.addr);
    let cache = format!("{}/kiln-e2e/app:buildcache", reg.addr);
    let builder_id = "http://127.0.0.1/kiln-e2e/app/actions/runs/42";

    let base_arg = format!("BASE={base}");
    let cache_from = format!("type=registry,ref={cache}");
    let cache_to = format!("type=registry,ref={cache},mode=max");
    let provenance = format!("mode=max,builder-id={builder_id}");
    let secret_arg = format!("id=GIT_AUTH_TOKEN,src={}", secret.display());
    let tag_latest = format!("{image}:latest");
    let tag_sha = format!("{image}:sha-0c1d2e3");
    let (iid, meta) = (
        iidfile.display().to_string(),
        metadata.display().to_string(),
    );
    // The order and spelling of build-push-action's `getArgs`: build flags, then the
    // common ones (`--metadata-file`, `--push`), then the context.
    let args: Vec<&str> = vec![
        "buildx",
        "build",
        "--build-arg",
        &base_arg,
        "--build-arg",
        "GREETING=hello",
        "--cache-from",
        &cache_from,
        "--cache-to",
        &cache_to,
        "--iidfile",
        &iid,
        "--label",
        "org.opencontainers.image.source=https://example.invalid/kiln-e2e/app",
        "--label",
        "org.opencontainers.image.revision=0c1d2e3f",
        "--provenance",
        &provenance,
        "--sbom",
        "true",
        "--secret",
        &secret_arg,
        "--tag",
        &tag_latest,
        "--tag",
        &tag_sha,
        "--metadata-file",
        &meta,
        "--push",
        ".",
    ];
    let out = docker.run(&args, &ctx);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "docker {}:\n{stderr}", args.join(" "));
    assert!(!stderr.contains("tok-3f9c2e"), "the secret is never logged");

    // What build-push-action reads back: `digest` and `metadata` from the metadata file,
    // `imageid` from the iidfile.
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&metadata).unwrap()).unwrap();
    let digest = meta["containerimage.digest"].as_str().unwrap().to_owned();
    assert!(digest.starts_with("sha256:"), "{meta:#}");
    let config_digest = meta["containerimage.config.digest"].as_str().unwrap();
    assert_eq!(meta["containerimage.descriptor"]["digest"], digest);
    let names = meta["image.name"].as_str().unwrap();
    assert!(
        names.contains(&tag_latest) && names.contains(&tag_sha),
        "{meta:#}"
    );
    assert!(
        meta["buildx.build.ref"]
            .as_str()
            .unwrap()
            .starts_with("kiln/kiln0/"),
        "{meta:#}"
    );
    let iid = std::fs::read_to_string(&iidfile).unwrap();
    assert_eq!(iid.trim(), config_digest, "the iidfile holds the image id");

    // The pushed result is an index: the image and its attestation manifest (BuildKit's
    // layout), as `imagetools inspect` shows it.
    let text = docker.ok(&["buildx", "imagetools", "inspect", &tag_latest], &ctx);
    assert!(text.contains(&format!("Digest:    {digest}")), "{text}");
    assert!(
        text.contains("MediaType: application/vnd.oci.image.index.v1+json"),
        "{text}"
    );
    assert!(text.contains("Platform:    linux/"), "{text}");
    assert!(text.contains("Platform:    unknown/unknown"), "{text}");
    assert!(
        text.contains("vnd.docker.reference.type:   attestation-manifest"),
        "{text}"
    );
    let raw: serde_json::Value = serde_json::from_str(&docker.ok(
        &["buildx", "imagetools", "inspect", "--raw", &tag_latest],
        &ctx,
    ))
    .unwrap();
    let manifests = raw["manifests"].as_array().unwrap();
    let image_desc = manifests
        .iter()
        .find(|m| m["platform"]["os"] == "linux")
        .expect("an image manifest for linux");
    let att_desc = manifests
        .iter()
        .find(|m| m["annotations"]["vnd.docker.reference.type"] == "attestation-manifest")
        .expect("an attestation manifest");
    assert_eq!(
        att_desc["annotations"]["vnd.docker.reference.digest"],
        image_desc["digest"]
    );
    // Its layers are in-toto statements, typed by annotation.
    let att = skopeo_inspect(
        &format!("{image}@{}", att_desc["digest"].as_str().unwrap()),
        &["--raw"],
    );
    let types: Vec<&str> = att["layers"]
        .as_array()
        .unwrap()
        .iter()
        .inspect(|l| assert_eq!(l["mediaType"], "application/vnd.in-toto+json"))
        .map(|l| {
            l["annotations"]["in-toto.io/predicate-type"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert!(types.contains(&"https://spdx.dev/Document"), "{att:#}");
    assert!(
        types
            .iter()
            .any(|t| t.starts_with("https://slsa.dev/provenance/")),
        "{att:#}"
    );

    // `{{json .Provenance}}`: SLSA provenance with the builder id, the frontend and the
    // build args; mode=max adds the build's steps; the secret's value is nowhere.
    let prov_text = docker.ok(
        &[
            "buildx",
            "imagetools",
            "inspect",
            &tag_latest,
            "--format",
            "{{json .Provenance}}",
        ],
        &ctx,
    );
    assert!(
        !prov_text.contains("tok-3f9c2e"),
        "no secret in the provenance"
    );
    let prov: serde_json::Value = serde_json::from_str(&prov_text).unwrap();
    let slsa = &prov["SLSA"];
    assert_eq!(slsa["builder"]["id"], builder_id, "{prov:#}");
    assert_eq!(
        slsa["invocation"]["parameters"]["frontend"], "dockerfile.v0",
        "{prov:#}"
    );
    assert_eq!(
        slsa["invocation"]["parameters"]["args"]["build-arg:GREETING"], "hello",
        "{prov:#}"
    );
    assert!(
        slsa["materials"].as_array().is_some_and(|m| m
            .iter()
            .any(|m| m["uri"].as_str().is_some_and(|u| u.contains("busybox")))),
        "the base image is a material: {prov:#}"
    );
    assert!(
        slsa["buildConfig"].is_object(),
        "mode=max adds the steps: {prov:#}"
    );

    // `{{json .SBOM}}`: an SPDX document listing the dpkg package.
    let sbom: serde_json::Value = serde_json::from_str(&docker.ok(
        &[
            "buildx",
            "imagetools",
            "inspect",
            &tag_latest,
            "--format",
            "{{json .SBOM}}",
        ],
        &ctx,
    ))
    .unwrap();
    let spdx = &sbom["SPDX"];
    assert!(
        spdx["spdxVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("SPDX-")),
        "{sbom:#}"
    );
    assert!(
        spdx["packages"].as_array().is_some_and(|p| p
            .iter()
            .any(|p| p["name"] == "kiln-test-pkg" && p["versionInfo"] == "1.2.3-4")),
        "{sbom:#}"
    );

    // `{{json .Image}}` and `{{json .Manifest}}`.
    let config: serde_json::Value = serde_json::from_str(&docker.ok(
        &[
            "buildx",
            "imagetools",
            "inspect",
            &tag_latest,
            "--format",
            "{{json .Image}}",
        ],
        &ctx,
    ))
    .unwrap();
    assert_eq!(
        config["config"]["Labels"]["org.opencontainers.image.revision"],
        "0c1d2e3f"
    );
    let manifest: serde_json::Value = serde_json::from_str(&docker.ok(
        &[
            "buildx",
            "imagetools",
            "inspect",
            &tag_latest,
            "--format",
            "{{json .Manifest}}",
        ],
        &ctx,
    ))
    .unwrap();
    assert_eq!(manifest["digest"], digest);

    // skopeo sees the labels under both tags; the cache went to its ref; podman runs it.
    let inspected = skopeo_inspect(&tag_sha, &[]);
    // skopeo names what the tag points at: the index, the metadata file's digest.
    assert_eq!(inspected["Digest"], digest.as_str());
    assert_eq!(
        inspected["Labels"]["org.opencontainers.image.source"],
        "https://example.invalid/kiln-e2e/app"
    );
    skopeo_inspect(&cache, &["--raw"]);
    let printed = podman_run(&tag_latest);
    assert_eq!(printed, "hello from kiln\nsecret-seen\nno-secret-file\n");
}

#[test]
fn docker_build_runs_kiln_through_the_builder_alias() {
    require_root("builds run RUN steps in containers");
    require_program("skopeo");
    let f = Fixture::new();
    let reg = TestRegistry::kiln();
    let base = f.push_base(&reg);
    let docker = DockerCli::install(&f, "alias");
    let ctx = f.path("alias-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "ARG BASE\nFROM $BASE\nARG WHO\nRUN echo \"built by $WHO\" > /who\nCMD [\"cat\", \"/who\"]\n",
    )
    .unwrap();
    let image = format!("{}/kiln-e2e/alias:1", reg.addr);
    let base_arg = format!("BASE={base}");
    // Without the alias, Debian's 20.10 CLI runs `docker build` against the daemon itself.
    docker.ok(&["buildx", "install"], &ctx);
    let out = docker.ok(
        &[
            "build",
            "--build-arg",
            &base_arg,
            "--build-arg",
            "WHO=docker-build",
            "-t",
            &image,
            "--push",
            ".",
        ],
        &ctx,
    );
    let _ = out;
    let inspected = skopeo_inspect(&image, &[]);
    assert!(inspected["Digest"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(podman_run(&image), "built by docker-build\n");
}

#[test]
fn imagetools_create_merges_sources_into_one_index_in_another_repository() {
    require_root("builds run RUN steps in containers");
    require_program("skopeo");
    let f = Fixture::new();
    let reg = TestRegistry::kiln();
    let base = f.push_base(&reg);
    let docker = DockerCli::install(&f, "it");
    let cwd = f.path("app");
    let src = format!("{}/kiln-e2e/src:1", reg.addr);
    let base_digest = skopeo_inspect(&base, &[])["Digest"]
        .as_str()
        .unwrap()
        .to_owned();
    // Two sources: the base by tag, and an image made from it in another repository.
    docker.ok(&["buildx", "imagetools", "create", "-t", &src, &base], &cwd);
    assert_eq!(skopeo_inspect(&src, &[])["Digest"], base_digest.as_str());

    let target = format!("{}/kiln-e2e/merged:1", reg.addr);
    let dry = docker.ok(
        &[
            "buildx",
            "imagetools",
            "create",
            "--dry-run",
            "--annotation",
            "index:org.opencontainers.image.title=merged",
            "-t",
            &target,
            &src,
        ],
        &cwd,
    );
    let planned: serde_json::Value = serde_json::from_str(&dry).unwrap();
    assert_eq!(planned["manifests"][0]["digest"], base_digest.as_str());
    assert_eq!(
        planned["annotations"]["org.opencontainers.image.title"],
        "merged"
    );
    let nothing = Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            &format!("docker://{target}"),
        ])
        .output()
        .unwrap();
    assert!(!nothing.status.success(), "--dry-run pushes nothing");

    let pushed = docker.ok(
        &[
            "buildx",
            "imagetools",
            "create",
            "--annotation",
            "index:org.opencontainers.image.title=merged",
            "-t",
            &target,
            &src,
        ],
        &cwd,
    );
    assert!(pushed.starts_with(&target), "{pushed}");
    let text = docker.ok(&["buildx", "imagetools", "inspect", &target], &cwd);
    assert!(
        text.contains("MediaType: application/vnd.oci.image.index.v1+json"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{}@{base_digest}", target)),
        "{text}"
    );
    // Every blob was copied into the new repository: the image runs from there.
    let copied = format!("{}/kiln-e2e/merged@{base_digest}", reg.addr);
    assert_eq!(skopeo_inspect(&copied, &[])["Digest"], base_digest.as_str());
    let image: serde_json::Value = serde_json::from_str(&docker.ok(
        &[
            "buildx",
            "imagetools",
            "inspect",
            &target,
            "--format",
            "{{json .Image}}",
        ],
        &cwd,
    ))
    .unwrap();
    assert_eq!(image["os"], "linux");
    let bad = docker.run(
        &[
            "buildx",
            "imagetools",
            "inspect",
            &target,
            "--format",
            "{{range .Manifest}}",
        ],
        &cwd,
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--format"));
}
