//! Several target platforms in one solve: a `FROM --platform=$BUILDPLATFORM` stage runs once
//! for every target, each target gets its own TARGET* args, and a build whose RUN steps need
//! an emulator that is not registered fails before any step runs, with the fix.
//!
//! The solve runs real containers: as root (CI runs it so). The native stage is made from the
//! host's busybox-static copied into a `FROM scratch` stage, so no registry is needed and no
//! target stage runs anything foreign.

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kiln_graph::{BuildOptions, Platform};
use kiln_solver::Event;
use kiln_store::Store;
use kiln_worker::build::{plan_build, BuildError, BuildInputs};
use kiln_worker::engine::{ContextFilter, ImageProvider, Rootfs};
use kiln_worker::error::WorkerError;
use kiln_worker::provider::BaseImage;

/// Base images are never pulled here: every stage starts `FROM scratch`.
struct NoImages;

impl ImageProvider for NoImages {
    fn resolve(&self, reference: &str, _platform: &Platform) -> Result<BaseImage, WorkerError> {
        Err(WorkerError::Internal(format!(
            "this test pulls no image, but {reference} was asked for"
        )))
    }
}

fn inputs(dockerfile: &kiln_dockerfile::Dockerfile) -> BuildInputs<'_> {
    BuildInputs {
        dockerfile,
        dockerignore: &[],
        images: Arc::new(NoImages),
        context_filter: Arc::new(|_: &[String]| ContextFilter {
            excluded: Box::new(|_: &str, _: bool| false),
            may_reinclude: Box::new(|_: &str| false),
        }),
        source_date_epoch: Some(1_700_000_000),
        compression: None,
    }
}

fn options(context: &Path, platforms: &[&str]) -> BuildOptions {
    let mut opts = BuildOptions::for_context(context);
    opts.platforms = platforms
        .iter()
        .map(|p| Platform::parse(p).unwrap())
        .collect();
    opts
}

/// The files of the top layer of `fs`, with their contents.
fn top_layer_files(store: &Store, fs: &Rootfs) -> Vec<(String, String)> {
    let layer = fs.layers.last().expect("a layer");
    let blob = std::fs::File::open(store.content().blob_path(&layer.blob.digest)).unwrap();
    let (_, reader) = kiln_oci::compression::decompressing_reader(std::io::BufReader::new(blob))
        .expect("a compressed layer");
    let mut archive = tar::Archive::new(reader);
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut text = String::new();
        if entry.header().entry_type().is_file() {
            entry.read_to_string(&mut text).unwrap();
        }
        out.push((path, text));
    }
    out
}

const CROSS_BUILD: &str = "FROM --platform=$BUILDPLATFORM scratch AS tools
COPY busybox /bin/busybox
RUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox uname -m > /machine\"]

FROM scratch
ARG TARGETARCH
COPY --from=tools /machine /built-on
COPY <<EOF /target
$TARGETARCH
EOF
";

#[test]
fn a_native_stage_runs_once_for_two_target_platforms() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test runs a real container: run it as root (CI does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let context = tmp.path().join("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::copy("/bin/busybox", context.join("busybox"))
        .expect("/bin/busybox (apt-get install busybox-static)");
    let store = Arc::new(Store::open(tmp.path().join("state")).unwrap());
    let dockerfile = kiln_dockerfile::parse(CROSS_BUILD).unwrap();
    let opts = options(&context, &["linux/amd64", "linux/arm64"]);
    let planned = plan_build(store.clone(), &opts, inputs(&dockerfile)).unwrap();
    assert_eq!(planned.platforms.len(), 2);

    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let sink = events.clone();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let solved = runtime
        .block_on(planned.solve(
            Arc::new(move |e: Event| sink.lock().unwrap().push(e)),
            |_| {},
        ))
        .unwrap();

    // One RUN vertex in the joined graph, started once, named with the build platform.
    let host = Platform::host().to_string();
    let runs: Vec<usize> = solved
        .graph
        .vertices
        .iter()
        .enumerate()
        .filter(|(_, v)| matches!(v.op, kiln_graph::Op::Exec(_)))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(runs.len(), 1, "{:#?}", solved.graph.vertices);
    let run = runs[0];
    assert!(
        solved.graph.vertices[run]
            .meta
            .description
            .starts_with(&format!("[{host} tools 2/2] RUN")),
        "{}",
        solved.graph.vertices[run].meta.description
    );
    let started = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, Event::Started { node, .. } if *node == run))
        .count();
    assert_eq!(started, 1);

    // Each target has its own TARGETARCH, and both copied the one native result.
    let machine = std::process::Command::new("uname")
        .arg("-m")
        .output()
        .unwrap();
    let machine = String::from_utf8_lossy(&machine.stdout).into_owned();
    assert_eq!(solved.platforms.len(), 2);
    for (part, arch) in solved.platforms.iter().zip(["amd64", "arm64"]) {
        assert_eq!(part.platform.architecture, arch);
        let fs = part.rootfs.as_ref().expect("a root filesystem");
        let below = &fs.layers[fs.layers.len() - 2];
        let built_on = Rootfs::new(vec![below.clone()], None, None);
        assert_eq!(
            top_layer_files(&store, &built_on),
            vec![("built-on".to_owned(), machine.clone())]
        );
        assert_eq!(
            top_layer_files(&store, fs),
            vec![("target".to_owned(), format!("{arch}\n"))]
        );
        assert_eq!(
            part.graph.target_stage().config.architecture,
            arch,
            "the image config names the target platform"
        );
    }
}

#[test]
fn a_foreign_run_without_an_emulator_fails_before_any_step_with_the_fix() {
    // The probe reads this directory instead of /proc/sys/fs/binfmt_misc: empty, as on a
    // machine where binfmt_misc is not mounted. This test binary sets it before any thread
    // probes, and its other test never runs a foreign platform.
    let binfmt = tempfile::tempdir().unwrap();
    std::env::set_var(kiln_exec::platforms::BINFMT_DIR_ENV, binfmt.path());
    let foreign = if Platform::host().architecture == "arm64" {
        "linux/amd64"
    } else {
        "linux/arm64"
    };
    let tmp = tempfile::tempdir().unwrap();
    let context = tmp.path().join("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(context.join("sh"), "not run").unwrap();
    let store = Arc::new(Store::open(tmp.path().join("state")).unwrap());
    let dockerfile = kiln_dockerfile::parse(
        "FROM --platform=$BUILDPLATFORM scratch AS tools\nCOPY sh /sh\n\
         FROM scratch\nARG TARGETARCH\nCOPY --from=tools /sh /sh\nRUN [\"/sh\"]\n",
    )
    .unwrap();
    let host = Platform::host().to_string();
    let opts = options(&context, &[&host, foreign]);
    let err = match plan_build(store.clone(), &opts, inputs(&dockerfile)) {
        Ok(_) => panic!("a build with {foreign} RUN steps and no emulator was planned"),
        Err(e) => e,
    };
    let BuildError::Emulation {
        platform,
        step,
        fix,
    } = &err
    else {
        panic!("want an emulation error, got {err}");
    };
    assert_eq!(platform, foreign);
    assert!(
        step.starts_with(&format!("[{foreign} stage-1 ")) && step.ends_with("RUN [\"/sh\"]"),
        "{step}"
    );
    let qemu = if foreign == "linux/arm64" {
        "qemu-aarch64"
    } else {
        "qemu-x86_64"
    };
    let dir = binfmt.path().display().to_string();
    for want in [
        format!("mount -t binfmt_misc binfmt_misc {dir}"),
        "apt-get install qemu-user-static".to_owned(),
        format!("/usr/lib/binfmt.d/{qemu}.conf"),
    ] {
        assert!(fix.contains(&want), "want {want:?} in: {fix}");
    }
    let text = err.to_string();
    assert!(
        text.contains(foreign) && text.contains(fix.as_str()),
        "{text}"
    );
    // Nothing ran: no step left a record or a snapshot.
    let snapshots = tmp.path().join("state/snapshots");
    let left: Vec<_> = std::fs::read_dir(&snapshots)
        .map(|d| d.filter_map(|e| e.ok()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "snapshots made: {left:?}");
}
