//! One cache export holds the records of every target platform of a build: a fresh state dir
//! importing it builds both platforms from hits alone, a later build of one platform hits
//! too, and a build adding a platform hits the shared native stage and runs only its own
//! steps.
//!
//! Builds run real containers: as root (CI runs it so). The native stage is the host's
//! busybox-static in a `FROM scratch` stage, so no registry and no emulator is needed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kiln_build::cache::{CacheExport, CacheImport};
use kiln_build::{BuildEvent, BuildOutcome, BuildRequest, StepOutcome};
use kiln_graph::{BuildOptions, Platform};

const DOCKERFILE: &str = r#"FROM --platform=$BUILDPLATFORM scratch AS tools
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox uname -m > /machine"]

FROM scratch
ARG TARGETARCH
COPY --from=tools /bin/busybox /bin/busybox
COPY --from=tools /machine /built-on
RUN ["/bin/busybox", "sh", "-c", "echo $TARGETARCH > /target"]
"#;

struct Dirs {
    tmp: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert!(
            euid == 0,
            "these builds run real containers: run them as root (CI does)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let context = tmp.path().join("context");
        std::fs::create_dir_all(&context).unwrap();
        std::fs::copy("/bin/busybox", context.join("busybox"))
            .expect("/bin/busybox (apt-get install busybox-static)");
        Dirs { tmp }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Builds for `platforms` on the state dir `state`, importing and exporting the local
    /// cache `cache` as asked (`mode=max`).
    fn build(&self, state: &str, platforms: &[&str], import: bool, export: bool) -> BuildOutcome {
        let mut options = BuildOptions::for_context(self.path("context"));
        options.platforms = platforms
            .iter()
            .map(|p| Platform::parse(p).unwrap())
            .collect();
        let dockerfile = kiln_dockerfile::parse(DOCKERFILE).unwrap();
        let mut request = BuildRequest::new(options, dockerfile, self.path(state));
        request.dockerfile_source = DOCKERFILE.to_owned();
        let cache = self.path("cache").display().to_string();
        let attrs = |k: &str| BTreeMap::from([(k.to_owned(), cache.clone())]);
        if import {
            request.cache_imports =
                vec![CacheImport::from_attrs("local", &attrs("src"), "--import-cache").unwrap()];
        }
        if export {
            let mut a = attrs("dest");
            a.insert("mode".into(), "max".into());
            request.cache_exports =
                vec![CacheExport::from_attrs("local", &a, "--export-cache").unwrap()];
        }
        let warnings = std::sync::Mutex::new(Vec::new());
        let sink = |e: BuildEvent| {
            if let BuildEvent::Warning(w) = e {
                warnings.lock().unwrap().push(w);
            }
        };
        match kiln_build::run(request, &sink) {
            Ok(o) => o,
            Err(e) => panic!("build of {platforms:?} failed: {e}"),
        }
    }
}

fn named<'a>(steps: &'a [StepOutcome], prefix: &str, suffix: &str) -> Vec<&'a StepOutcome> {
    steps
        .iter()
        .filter(|s| s.name.starts_with(prefix) && s.name.ends_with(suffix))
        .collect()
}

/// The steps that ran (the build context is read each build: not a step that caches).
fn ran(steps: &[StepOutcome]) -> Vec<&str> {
    steps
        .iter()
        .filter(|s| s.status == "run" && !s.name.starts_with("[internal]"))
        .map(|s| s.name.as_str())
        .collect()
}

#[test]
fn one_cache_export_serves_every_platform_and_any_subset() {
    let dirs = Dirs::new();
    let host = Platform::host().to_string();
    let first = dirs.build("state-1", &[&host, "linux/arm64"], false, true);
    // The native stage ran once; each target's own RUN ran once.
    let ran_first = ran(&first.steps);
    assert_eq!(
        named(&first.steps, &format!("[{host} tools 2/2]"), "/machine\"]").len(),
        1,
        "{ran_first:#?}"
    );
    for p in [host.as_str(), "linux/arm64"] {
        let own = named(&first.steps, &format!("[{p} stage-1 3/3]"), "/target\"]");
        assert_eq!(own.len(), 1, "{p}: {ran_first:#?}");
        assert_eq!(own[0].status, "run");
        assert_eq!(own[0].stage.as_deref(), Some(&*format!("{p} stage-1")));
    }

    // A fresh runner: both platforms from the one export, nothing runs.
    let fresh = dirs.build("state-2", &[&host, "linux/arm64"], true, false);
    assert_eq!(ran(&fresh.steps), Vec::<&str>::new());
    for p in [host.as_str(), "linux/arm64"] {
        let own = named(&fresh.steps, &format!("[{p} stage-1 3/3]"), "/target\"]");
        assert_eq!(own.len(), 1, "{p}: {:#?}", fresh.steps);
        assert_eq!(own[0].status, "cached");
        assert_ne!(own[0].cache_source.as_deref(), Some("local"));
    }

    // Later, one platform alone: its records are there.
    let arm = dirs.build("state-3", &["linux/arm64"], true, false);
    assert_eq!(ran(&arm.steps), Vec::<&str>::new(), "{:#?}", arm.steps);
    assert!(
        arm.steps.iter().any(|s| s.status == "cached"),
        "{:#?}",
        arm.steps
    );

    // A platform never exported: the shared native stage hits, only its own RUN runs.
    let other = if host == "linux/amd64" {
        "linux/386"
    } else {
        "linux/arm64"
    };
    if other != "linux/arm64" {
        let added = dirs.build("state-4", &[&host, other], true, false);
        assert_eq!(
            ran(&added.steps),
            vec![format!(
                "[{other} stage-1 3/3] RUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo $TARGETARCH > /target\"]"
            )],
            "{:#?}",
            added.steps
        );
    }
}
