//! `docker buildx build`'s flags, as a command line generated for buildx passes them: image
//! labels, the image ID (`--iidfile`, `-q`), the metadata file's buildx keys, the settings
//! of `RUN` containers (`--add-host`, `--shm-size`, `--ulimit`, `--cgroup-parent`), the
//! `--output` shorthands, a Dockerfile on stdin, and clear errors for what kiln refuses.
//! Builds are real (busybox-static images, kiln's registry, skopeo); the ones that run steps
//! need root.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

fn project(f: &Fixture, name: &str, dockerfile: &str) -> PathBuf {
    let dir = f.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    dir
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kiln build ARGS` with `stdin` on its standard input.
fn kiln_with_stdin(f: &Fixture, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(f.root())
        .args(args)
        .current_dir(f.path("app"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

#[test]
fn labels_iidfile_quiet_and_metadata_follow_buildx_on_push() {
    require_root("labels_iidfile_quiet_and_metadata_follow_buildx_on_push");
    let f = Fixture::new();
    let reg = TestRegistry::kiln();
    let dir = project(
        &f,
        "labels",
        "FROM busybox:latest\nRUN echo built > /built\n",
    );
    let image = format!("{}/flags/app:1", reg.addr);
    let iid = f.path("iid");
    let meta = f.path("meta.json");
    // A stale ID file from an earlier build is replaced.
    std::fs::write(&iid, "stale").unwrap();
    let out = f.kiln(&[
        "build",
        dir.to_str().unwrap(),
        "--builder",
        "kiln",
        "-t",
        &image,
        "--push",
        // buildx attaches a provenance by default when pushing (an index); this test reads
        // the image manifest itself.
        "--provenance=false",
        "--label",
        "org.opencontainers.image.title=flags",
        "--label",
        "com.example.empty",
        "--iidfile",
        iid.to_str().unwrap(),
        "--metadata-file",
        meta.to_str().unwrap(),
        "-q",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let meta: serde_json::Value = serde_json::from_str(&read(&meta)).unwrap();
    let config = meta["containerimage.config.digest"].as_str().unwrap();
    let manifest = meta["containerimage.digest"].as_str().unwrap();
    assert!(config.starts_with("sha256:") && manifest.starts_with("sha256:"));
    // buildx's image ID is the config digest: in the ID file and, alone, on stdout.
    assert_eq!(read(&iid), config);
    assert_eq!(stdout(&out), format!("{config}\n"));
    // -q: no progress on stderr.
    assert!(
        !stderr(&out).contains("RUN echo built"),
        "progress was printed with -q:\n{}",
        stderr(&out)
    );
    assert_eq!(meta["containerimage.descriptor"]["digest"], manifest);
    assert_eq!(meta["image.name"], image.as_str());
    let build_ref = meta["buildx.build.ref"].as_str().unwrap();
    assert!(
        build_ref.starts_with("kiln/kiln0/") && build_ref.len() > "kiln/kiln0/".len(),
        "{build_ref}"
    );
    assert!(meta["kiln.steps"].is_array(), "kiln's own keys stay");
    let pushed = skopeo_inspect(&image, &[]);
    assert_eq!(pushed["Digest"], manifest);
    assert_eq!(pushed["Labels"]["org.opencontainers.image.title"], "flags");
    assert_eq!(pushed["Labels"]["com.example.empty"], "");
    let pushed_config = skopeo_inspect(&image, &["--raw"]);
    assert_eq!(pushed_config["config"]["digest"], config);
}

#[test]
fn quiet_refuses_a_progress_mode_that_prints() {
    let f = Fixture::new();
    let dir = project(&f, "quiet", "FROM busybox:latest\n");
    let out = f.kiln(&["build", dir.to_str().unwrap(), "-q", "--progress", "plain"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--quiet") && err.contains("--progress=plain"),
        "{err}"
    );
}

#[test]
fn add_host_shm_size_and_ulimit_reach_run_steps() {
    require_root("add_host_shm_size_and_ulimit_reach_run_steps");
    let f = Fixture::new();
    let dir = project(
        &f,
        "run-settings",
        "FROM busybox:latest\n\
         RUN mkdir /out && cat /etc/hosts > /out/hosts \
             && df -k /dev/shm | tail -n 1 > /out/shm \
             && ulimit -Sn > /out/nofile-soft && ulimit -Hn > /out/nofile-hard\n\
         FROM scratch\nCOPY --from=0 /out /\n",
    );
    let dest = f.path("run-settings-out");
    let out = f.kiln(&[
        "build",
        dir.to_str().unwrap(),
        "--add-host",
        "db.internal:10.1.2.3",
        "--add-host",
        "v6.internal=[2001:db8::7],host.docker.internal=host-gateway",
        "--shm-size",
        "96m",
        "--ulimit",
        "nofile=1000:2000",
        "--progress",
        "plain",
        "-o",
        dest.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let hosts = read(&dest.join("hosts"));
    let lines: Vec<&str> = hosts.lines().collect();
    assert!(lines.contains(&"10.1.2.3\tdb.internal"), "{hosts}");
    assert!(lines.contains(&"2001:db8::7\tv6.internal"), "{hosts}");
    // kiln's own network: the host is slirp4netns's gateway.
    assert!(lines.contains(&"10.0.2.2\thost.docker.internal"), "{hosts}");
    // df -k: "shm  98304  0  98304  0% /dev/shm"
    let shm = read(&dest.join("shm"));
    assert_eq!(
        shm.split_whitespace().nth(1),
        Some((96 * 1024).to_string().as_str()),
        "{shm}"
    );
    assert_eq!(read(&dest.join("nofile-soft")).trim(), "1000");
    assert_eq!(read(&dest.join("nofile-hard")).trim(), "2000");

    // Another --add-host is another step: the cache does not hand back the old hosts file.
    let dest2 = f.path("run-settings-out2");
    let out = f.kiln(&[
        "build",
        dir.to_str().unwrap(),
        "--add-host",
        "db.internal:10.9.9.9",
        "--shm-size",
        "96m",
        "--ulimit",
        "nofile=1000:2000",
        "-o",
        dest2.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let hosts = read(&dest2.join("hosts"));
    assert!(
        hosts.lines().any(|l| l == "10.9.9.9\tdb.internal"),
        "{hosts}"
    );
    assert!(!hosts.contains("10.1.2.3"), "{hosts}");
}

#[test]
fn host_gateway_is_the_hosts_loopback_on_the_host_network() {
    require_root("host_gateway_is_the_hosts_loopback_on_the_host_network");
    let f = Fixture::new();
    let dir = project(
        &f,
        "gateway",
        "FROM busybox:latest\nRUN cat /etc/hosts > /hosts\nFROM scratch\nCOPY --from=0 /hosts /\n",
    );
    let dest = f.path("gateway-out");
    let out = f.kiln(&[
        "build",
        dir.to_str().unwrap(),
        "--network",
        "host",
        "--allow",
        "network.host",
        "--add-host",
        "host.docker.internal:host-gateway",
        "-o",
        dest.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let hosts = read(&dest.join("hosts"));
    assert!(
        hosts
            .lines()
            .any(|l| l == "127.0.0.1\thost.docker.internal"),
        "{hosts}"
    );
}

#[test]
fn a_ulimit_above_kilns_own_hard_limit_is_refused() {
    require_root("a_ulimit_above_kilns_own_hard_limit_is_refused");
    let f = Fixture::new();
    let dir = project(&f, "ulimit", "FROM busybox:latest\nRUN true\n");
    // Above fs.nr_open, so above any hard limit kiln can have.
    let out = f.kiln(&[
        "build",
        dir.to_str().unwrap(),
        "--ulimit",
        "nofile=1024:4294967296",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--ulimit nofile=1024:4294967296")
            && err.contains("above kiln's own hard limit"),
        "{err}"
    );
}

#[test]
fn cgroup_parent_holds_the_cgroups_of_run_steps() {
    require_root("cgroup_parent_holds_the_cgroups_of_run_steps");
    let f = Fixture::new();
    let dir = project(
        &f,
        "cgroup",
        "FROM busybox:latest\nRUN cat /proc/self/cgroup > /cgroup\nFROM scratch\nCOPY --from=0 /cgroup /\n",
    );
    let parent = format!("kiln-test-{}", std::process::id());
    let dest = f.path("cgroup-out");
    let out = f.kiln(&[
        "build",
        dir.to_str().unwrap(),
        "--cgroup-parent",
        &format!("/{parent}/builds"),
        "-o",
        dest.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cgroup = read(&dest.join("cgroup"));
    let pids_line = cgroup
        .lines()
        .find(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|c| c == "pids"))
        })
        .or_else(|| cgroup.lines().find(|l| l.starts_with("0::")))
        .unwrap_or_else(|| panic!("no pids cgroup in {cgroup}"));
    assert!(
        pids_line.contains(&format!(":/{parent}/builds/kiln/")),
        "{cgroup}"
    );
    // The runs' cgroups are gone; the parent the user named stays, as with Docker.
    for mount in [
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ] {
        let kiln_dir = Path::new(mount).join(&parent).join("builds/kiln");
        if kiln_dir.is_dir() {
            let left: Vec<_> = std::fs::read_dir(&kiln_dir)
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .collect();
            assert!(left.is_empty(), "left behind: {left:?}");
            let _ = std::fs::remove_dir(&kiln_dir);
            let _ = std::fs::remove_dir(kiln_dir.parent().unwrap());
            let _ = std::fs::remove_dir(Path::new(mount).join(&parent));
        }
    }
}

#[test]
fn a_dockerfile_on_stdin_builds_with_no_context_or_with_a_directory() {
    require_root("a_dockerfile_on_stdin_builds_with_no_context_or_with_a_directory");
    let f = Fixture::new();
    // `-` as CONTEXT: the Dockerfile from stdin, no files to copy.
    let dest = f.path("stdin-out");
    let out = kiln_with_stdin(
        &f,
        &["build", "-", "-o", dest.to_str().unwrap()],
        b"FROM busybox:latest\nRUN echo from-stdin > /msg\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read(&dest.join("msg")), "from-stdin\n");

    // `-f -`: the Dockerfile from stdin, the context a directory.
    let ctx = f.path("stdin-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("file.txt"), "from the context\n").unwrap();
    let dest = f.path("stdin-out2");
    let out = kiln_with_stdin(
        &f,
        &[
            "build",
            "-f",
            "-",
            ctx.to_str().unwrap(),
            "-o",
            dest.to_str().unwrap(),
        ],
        b"FROM scratch\nCOPY file.txt /\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read(&dest.join("file.txt")), "from the context\n");

    // A Dockerfile error names the stdin Dockerfile as `-`.
    let out = kiln_with_stdin(&f, &["build", "-"], b"FROM busybox:latest\nNOPE x\n");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("-:2"), "{}", stderr(&out));
}

#[test]
fn output_shorthands_write_a_directory_a_tarball_on_stdout_and_push_by_digest() {
    require_root("output_shorthands_write_a_directory_a_tarball_on_stdout_and_push_by_digest");
    let f = Fixture::new();
    let reg = TestRegistry::kiln();
    let dir = project(
        &f,
        "outputs",
        "FROM busybox:latest\nRUN echo out > /out.txt\n",
    );
    let d = dir.to_str().unwrap();

    // `-o DIR`: the local exporter.
    let dest = f.path("outputs-dir");
    let out = f.kiln(&["build", d, "-o", dest.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read(&dest.join("out.txt")), "out\n");

    // `-o -`: a tarball of the files on stdout.
    let out = f.kiln(&["build", d, "-o", "-", "--progress", "quiet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tar = f.path("outputs.tar");
    std::fs::write(&tar, &out.stdout).unwrap();
    let list = Command::new("tar").arg("tf").arg(&tar).output().unwrap();
    assert!(
        stdout(&list)
            .lines()
            .any(|l| l.trim_start_matches("./") == "out.txt"),
        "{}",
        stdout(&list)
    );

    // push-by-digest: the manifest is in the registry, no tag was made.
    let name = format!("{}/flags/bydigest", reg.addr);
    let meta = f.path("bydigest.json");
    let out = f.kiln(&[
        "build",
        d,
        "--metadata-file",
        meta.to_str().unwrap(),
        "--output",
        &format!("type=image,name={name},push-by-digest=true,name-canonical=true,push=true"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let meta: serde_json::Value = serde_json::from_str(&read(&meta)).unwrap();
    let digest = meta["containerimage.digest"].as_str().unwrap();
    assert_eq!(
        skopeo_inspect(&format!("{name}@{digest}"), &[])["Digest"],
        digest
    );
    let tags = Command::new("curl")
        .args([
            "-s",
            &format!("http://{}/v2/flags/bydigest/tags/list", reg.addr),
        ])
        .output()
        .unwrap();
    let tags: serde_json::Value = serde_json::from_slice(&tags.stdout).unwrap_or_default();
    assert!(
        tags["tags"].as_array().is_none_or(|t| t.is_empty()),
        "push-by-digest made a tag: {tags}"
    );

    // type=registry with Docker media types and gzip layers recompressed.
    let image = format!("{}/flags/docker-types:1", reg.addr);
    let out = f.kiln(&[
        "build",
        d,
        "--output",
        &format!("type=registry,name={image},oci-mediatypes=false,compression=gzip,force-compression=true"),
        "--provenance=false",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let raw = skopeo_inspect(&image, &["--raw"]);
    assert_eq!(
        raw["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    for l in raw["layers"].as_array().unwrap() {
        assert_eq!(
            l["mediaType"],
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
    }

    // type=registry, OCI media types, zstd layers.
    let image = format!("{}/flags/zstd:1", reg.addr);
    let out = f.kiln(&[
        "build",
        d,
        "--output",
        &format!("type=registry,name={image},oci-mediatypes=true,compression=zstd,force-compression=true"),
        "--provenance=false",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let raw = skopeo_inspect(&image, &["--raw"]);
    assert_eq!(
        raw["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    for l in raw["layers"].as_array().unwrap() {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
    }
}

/// Each bad value: the flag named, a non-zero exit, nothing built.
#[test]
fn bad_values_and_unknown_flags_are_refused_naming_the_flag() {
    let f = Fixture::new();
    let dir = project(&f, "bad", "FROM busybox:latest\n");
    let d = dir.to_str().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--add-host", "db"], &["--add-host", "NAME:IP"]),
        (
            &["--add-host", "db:not-an-ip"],
            &["--add-host", "not an IP address"],
        ),
        (&["--shm-size", "12x"], &["--shm-size"]),
        (
            &["--ulimit", "files=10"],
            &["--ulimit", "unknown limit `files`"],
        ),
        (
            &["--ulimit", "nofile=4096:1024"],
            &["--ulimit", "above the hard limit"],
        ),
        (&["--cgroup-parent", "../escape"], &["--cgroup-parent"]),
        (&["--label", "=x"], &["--label"]),
        (
            &["--network", "bridge"],
            &["--network", "default, none or host"],
        ),
        (
            &["--network", "host"],
            &["--network", "--allow network.host"],
        ),
        (
            &["--allow", "device"],
            &["--allow", "network.host or security.insecure"],
        ),
        (&["--progress", "fancy"], &["--progress"]),
        (&["--call", "nothing"], &["--call"]),
        (
            &["--platform", "linux/amd64,linux/arm64", "--load"],
            &["docker exporter does not currently support exporting manifest lists"],
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["build", d];
        all.extend(*args);
        let out = f.kiln(&all);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        for w in *want {
            assert!(err.contains(w), "{args:?}: want {w:?} in:\n{err}");
        }
    }
    // A URL that is no git repository: a clear error naming the argument, nothing fetched.
    let url = "https://example.com/context.tar.gz";
    let out = f.kiln(&["build", url]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{url}: {err}");
    assert!(
        err.contains("CONTEXT") && err.contains(url) && err.contains("download"),
        "{url}: {err}"
    );
    // A git repository that cannot be fetched: git's reason, naming the argument.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("git://127.0.0.1:{port}/nothing.git#main");
    let out = f.kiln(&["build", &url]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{url}: {err}");
    assert!(
        err.contains("for CONTEXT") && err.contains(&url) && err.contains("git fetch"),
        "{url}: {err}"
    );
    // BUILDKIT_PROGRESS gives the progress mode, as in buildx; a bad one is named.
    let out = f.kiln_env(
        &["build", d, "--dry-run"],
        &[("BUILDKIT_PROGRESS", "fancy")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("BUILDKIT_PROGRESS"),
        "{}",
        stderr(&out)
    );
    let out = f.kiln_env(
        &["build", d, "--dry-run", "-q"],
        &[("BUILDKIT_PROGRESS", "plain")],
    );
    assert!(
        out.status.success(),
        "-q wins over BUILDKIT_PROGRESS: {}",
        stderr(&out)
    );
    // An unknown flag: clap's usage error (exit 2) names it.
    let out = f.kiln(&["build", d, "--frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--frobnicate"), "{}", stderr(&out));
    // docker build's legacy flags that buildx ignores are accepted.
    let out = f.kiln(&[
        "build",
        d,
        "--rm",
        "--force-rm",
        "--compress",
        "--isolation",
        "default",
        "-m",
        "1g",
        "--cpu-shares",
        "2",
        "--security-opt",
        "seccomp=unconfined",
        "--dry-run",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `git daemon` serving `root` on a loopback port, stopped when dropped.
struct GitDaemon {
    child: std::process::Child,
    port: u16,
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl GitDaemon {
    fn serve(root: &Path) -> Self {
        require_program("git");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("git")
            .arg("daemon")
            .arg("--reuseaddr")
            .arg("--export-all")
            .arg(format!("--base-path={}", root.display()))
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git is installed (.ci/install)");
        let daemon = GitDaemon { child, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return daemon;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("git daemon did not listen on 127.0.0.1:{port}");
    }
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=kiln",
            "-c",
            "user.email=kiln@example.invalid",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", stderr(&out));
}

#[test]
fn a_git_url_context_builds_the_commit_and_directory_it_names() {
    require_root("a_git_url_context_builds_the_commit_and_directory_it_names");
    let f = Fixture::new();
    let repos = f.path("repos");
    let repo = repos.join("app.git");
    std::fs::create_dir_all(repo.join("sub")).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("sub/Dockerfile"), "FROM scratch\nCOPY . /\n").unwrap();
    std::fs::write(repo.join("sub/msg"), "from main\n").unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "main"]);
    git(&repo, &["checkout", "-q", "-b", "other"]);
    std::fs::write(repo.join("sub/msg"), "from other\n").unwrap();
    git(&repo, &["commit", "-q", "-am", "other"]);
    git(&repo, &["checkout", "-q", "main"]);
    let daemon = GitDaemon::serve(&repos);

    for (fragment, want) in [("main:sub", "from main\n"), ("other:sub", "from other\n")] {
        let url = format!("git://127.0.0.1:{}/app.git#{fragment}", daemon.port);
        let dest = f.path(&format!("git-out-{}", fragment.replace(':', "-")));
        let out = f.kiln(&["build", &url, "-o", dest.to_str().unwrap()]);
        assert!(out.status.success(), "{url}: {}", stderr(&out));
        assert_eq!(read(&dest.join("msg")), want, "{url}");
        assert!(dest.join("Dockerfile").is_file(), "{url}");
        assert!(!dest.join(".git").exists(), "{url}: .git is in the context");
    }

    // A directory the commit does not have: named in the error.
    let url = format!("git://127.0.0.1:{}/app.git#main:nowhere", daemon.port);
    let out = f.kiln(&["build", &url]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("for CONTEXT") && stderr(&out).contains("\"nowhere\""),
        "{}",
        stderr(&out)
    );
}
