//! Rootless kiln end to end: root creates an ordinary user (with and without subordinate ids),
//! then runs `kiln` as that user. The `examples/` build with registry cache export and import
//! must give the same image digest as a root build (SOURCE_DATE_EPOCH), and the image must
//! run under podman. `docs/rootless.md` describes the modes.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{podman_runs_tests, require_program, require_root, Fixture, TestRegistry};

const EPOCH: &str = "1700000000";

/// An ordinary user created for one test, deleted (with its subordinate ids) when dropped.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
}

impl TestUser {
    /// Creates a user whose home is under `base`; `subids` keeps (or adds) a range in
    /// /etc/subuid and /etc/subgid, else any range useradd gave it is removed.
    fn create(tag: &str, base: &Path, subids: bool) -> TestUser {
        require_program("useradd");
        let name = format!("kiln{tag}{}", std::process::id() % 100_000);
        let home = base.join(format!("home-{name}"));
        let _ = Command::new("userdel").arg(&name).output();
        let out = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/bin/sh", "--home-dir"])
            .arg(&home)
            .arg(&name)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = |flag: &str| -> u32 {
            let o = Command::new("id").args([flag, &name]).output().unwrap();
            String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
        };
        let user = TestUser {
            uid: id("-u"),
            gid: id("-g"),
            name,
            home,
        };
        std::fs::create_dir_all(&user.home).unwrap();
        user.chown(&user.home);
        for (file, flag_add, flag_del) in [
            ("/etc/subuid", "--add-subuids", "--del-subuids"),
            ("/etc/subgid", "--add-subgids", "--del-subgids"),
        ] {
            let have = subid_range(file, &user.name);
            let (flag, range) = match (subids, have) {
                (true, Some(_)) | (false, None) => continue,
                // A range well above the ones useradd hands out.
                (true, None) => (flag_add, format!("{0}-{1}", 3_000_000, 3_000_000 + 65535)),
                (false, Some((start, count))) => {
                    (flag_del, format!("{start}-{}", start + count - 1))
                }
            };
            let out = Command::new("usermod")
                .args([flag, &range, &user.name])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "usermod {flag} {range}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(subid_range("/etc/subuid", &user.name).is_some(), subids);
        user
    }

    fn chown(&self, path: &Path) {
        let st = Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", self.uid, self.gid))
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Runs kiln as this user (setpriv: real and effective ids, its groups), with a clean
    /// environment: PATH, HOME and `env`.
    fn kiln(&self, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        let setpriv = require_program("setpriv");
        let mut c = Command::new(setpriv);
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--init-groups")
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .current_dir(dir)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("HOME", &self.home);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // userdel also drops the user's lines in /etc/subuid and /etc/subgid.
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

fn subid_range(file: &str, user: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        if f.next()? != user {
            return None;
        }
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    })
}

/// `dir/out`, where the test user writes its metadata files.
fn out_dir(dir: &Path, user: &TestUser) -> PathBuf {
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    user.chown(&out);
    out
}

/// A directory the test user can reach: the temp dirs of `tempfile` are private to root, and
/// the repository's own directory may sit under one only root can enter (a CI checkout in a
/// private temp dir), so it goes under the system's temp dir (sticky, open to every user).
fn shared_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("kiln-rootless-")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The example build's arguments (buildctl spelling) with `extra` appended.
fn example_args(base: &str, meta: &Path, extra: &[String]) -> Vec<String> {
    let mut a: Vec<String> = [
        "build",
        "--frontend",
        "dockerfile.v0",
        "--local",
        "context=.",
        "--local",
        "dockerfile=.",
        "--opt",
        "target=test",
        "--progress",
        "rawjson",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push("--opt".into());
    a.push(format!("build-arg:BASE_IMAGE={base}"));
    a.push("--metadata-file".into());
    a.push(meta.display().to_string());
    a.extend(extra.iter().cloned());
    a
}

fn meta(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn steps_with(meta: &serde_json::Value, status: &str) -> Vec<String> {
    meta["kiln.steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == status && !s["stage"].is_null())
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn rootless_example_build_matches_the_root_digest_and_its_registry_cache_warms_a_new_runner() {
    require_root("rootless_example_build... (creates a user, then drops to it)");
    require_program("newuidmap");
    require_program("newgidmap");
    let f = Fixture::new();
    let reg = TestRegistry::kiln();
    let base = f.push_base(&reg);
    let dir = shared_dir();
    let user = TestUser::create("rl", dir.path(), true);

    // The root build, in a state dir of its own.
    let root_meta = f.path("root-meta.json");
    let root_image = format!("{}/app/root:1", reg.addr);
    let out = f.kiln_env(
        &example_args(
            &base,
            &root_meta,
            &[
                "--output".into(),
                format!("type=image,name={root_image},push=true"),
            ],
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
        &[("SOURCE_DATE_EPOCH", EPOCH)],
    );
    assert!(out.status.success(), "root build: {}", stderr(&out));
    let root_digest = meta(&root_meta)["containerimage.digest"]
        .as_str()
        .unwrap()
        .to_owned();

    // The user's copy of the example.
    let app = dir.path().join("app");
    common::copy_dir(&common::workspace().join("examples"), &app);
    user.chown(&app);

    // `kiln debug env` as the user picks the subordinate-id mode.
    let env_out = user.kiln(&app, &["debug", "env"], &[]);
    let table = String::from_utf8_lossy(&env_out.stdout).into_owned();
    assert!(env_out.status.success(), "{table}{}", stderr(&env_out));
    assert!(
        table.contains("kiln builds in mode rootless-userns"),
        "{table}"
    );

    // First rootless runner: cold, exports the cache, pushes the image.
    let cache = format!("{}/app/cache:rootless", reg.addr);
    let user_image = format!("{}/app/user:1", reg.addr);
    let out_d = out_dir(dir.path(), &user);
    let m1 = out_d.join("meta-user-1.json");
    let out = user.kiln(
        &app,
        &example_args(
            &base,
            &m1,
            &[
                "--output".into(),
                format!("type=image,name={user_image},push=true"),
                "--export-cache".into(),
                format!("type=registry,ref={cache},mode=max"),
            ],
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
        &[("SOURCE_DATE_EPOCH", EPOCH)],
    );
    assert!(out.status.success(), "rootless build: {}", stderr(&out));
    assert!(
        !stderr(&out).contains("single-uid"),
        "subordinate ids are configured: {}",
        stderr(&out)
    );
    let m1 = meta(&m1);
    assert_eq!(
        m1["containerimage.digest"].as_str().unwrap(),
        root_digest,
        "a rootless build makes the same image as root"
    );
    assert!(steps_with(&m1, "cached").is_empty());
    // State lives in the user's data dir, owned by the user on the host.
    let state = user.home.join(".local/share/kiln");
    let md = std::fs::metadata(state.join("db")).expect("state under ~/.local/share/kiln");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(md.uid(), user.uid);

    // Second rootless runner, empty state under $XDG_DATA_HOME: all from the registry cache.
    let xdg = dir.path().join("xdg-runner-2");
    std::fs::create_dir_all(&xdg).unwrap();
    user.chown(&xdg);
    let m2 = out_d.join("meta-user-2.json");
    let out = user.kiln(
        &app,
        &example_args(
            &base,
            &m2,
            &[
                "--output".into(),
                format!("type=image,name={user_image},push=true"),
                "--import-cache".into(),
                format!("type=registry,ref={cache}"),
            ],
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
        &[
            ("SOURCE_DATE_EPOCH", EPOCH),
            ("XDG_DATA_HOME", xdg.to_str().unwrap()),
        ],
    );
    assert!(
        out.status.success(),
        "rootless warm build: {}",
        stderr(&out)
    );
    let m2 = meta(&m2);
    assert!(
        steps_with(&m2, "run").is_empty(),
        "the imported cache covers every step: ran {:?}",
        steps_with(&m2, "run")
    );
    assert_eq!(m2["containerimage.digest"].as_str().unwrap(), root_digest);
    assert!(
        xdg.join("kiln/db").is_dir(),
        "state under $XDG_DATA_HOME/kiln"
    );

    podman_runs_tests(&user_image);
}

#[test]
fn rootless_layers_keep_whiteouts_opaque_dirs_and_other_owners_as_root_builds_do() {
    require_root("rootless_layers_keep... (creates a user, then drops to it)");
    require_program("newuidmap");
    let f = Fixture::new();
    let reg = TestRegistry::kiln();
    let base = f.push_base(&reg);
    let dir = shared_dir();
    let user = TestUser::create("rw", dir.path(), true);
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\n\
         RUN mkdir -p /data/sub && echo a > /data/sub/f && echo b > /data/keep && chmod 1777 /tmp && chown 33:33 /data/keep\n\
         RUN rm -rf /data/sub && mkdir /data/sub && echo c > /data/sub/g && rm /data/keep\n\
         COPY --chown=33:33 hello.txt /srv/hello.txt\n\
         USER www-data\n\
         RUN mkdir -p /tmp/w && echo hi > /tmp/w/x\n\
         USER root\n\
         RUN test \"$(stat -c %u:%g /srv/hello.txt /tmp/w/x)\" = \"$(printf '33:33\\n33:33')\" && test ! -e /data/sub/f\n",
    )
    .unwrap();
    std::fs::write(ctx.join("hello.txt"), "hello\n").unwrap();
    user.chown(&ctx);
    let out_d = out_dir(dir.path(), &user);
    let build = |as_user: bool, name: &str| -> String {
        let meta_path = out_d.join(format!("{name}.json"));
        let image = format!("{}/layers/{name}:1", reg.addr);
        let m = meta_path.display().to_string();
        let ba = format!("BASE_IMAGE={base}");
        let o = format!("type=image,name={image},push=true");
        let args = [
            "build",
            ".",
            "--build-arg",
            &ba,
            "--progress",
            "plain",
            "--metadata-file",
            &m,
            "-o",
            &o,
        ];
        let env = [("SOURCE_DATE_EPOCH", EPOCH)];
        let out = if as_user {
            user.kiln(&ctx, &args, &env)
        } else {
            let root_state = f.root();
            let mut all = vec!["--root", root_state.to_str().unwrap()];
            all.extend(args);
            let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
            c.args(&all)
                .current_dir(&ctx)
                .env("SOURCE_DATE_EPOCH", EPOCH);
            c.output().unwrap()
        };
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        meta(&meta_path)["containerimage.digest"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let root = build(false, "root");
    let rootless = build(true, "rootless");
    assert_eq!(
        rootless, root,
        "same layers: whiteouts, opaque dirs, uid 33"
    );
}

#[test]
fn without_subordinate_ids_kiln_builds_single_uid_and_says_what_it_cannot_represent() {
    require_root("without_subordinate_ids... (creates a user, then drops to it)");
    let f = Fixture::new();
    let reg = TestRegistry::kiln();
    let base = f.push_base(&reg);
    let dir = shared_dir();
    let user = TestUser::create("su", dir.path(), false);

    let env_out = user.kiln(dir.path(), &["debug", "env"], &[]);
    let table = String::from_utf8_lossy(&env_out.stdout).into_owned();
    assert!(
        table.contains(&format!("add `{}:100000:65536`", user.name))
            && table.contains("/etc/subuid"),
        "{table}"
    );
    assert!(
        table.contains("kiln builds in mode rootless-single-uid"),
        "{table}"
    );

    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN echo built > /built && chown 33:33 /built || true\n",
    )
    .unwrap();
    user.chown(&ctx);
    let ba = format!("BASE_IMAGE={base}");
    let image = format!("{}/single/uid:1", reg.addr);
    let o = format!("type=image,name={image},push=true");
    let out = user.kiln(
        &ctx,
        &[
            "build",
            ".",
            "--build-arg",
            &ba,
            "--progress",
            "plain",
            "-o",
            &o,
        ],
        &[],
    );
    let err = stderr(&out);
    assert!(out.status.success(), "single-uid build: {err}");
    assert!(
        err.contains("WARNING: rootless single-uid mode")
            && err.contains("COPY --chown")
            && err.contains(&format!("`{}:100000:65536`", user.name)),
        "{err}"
    );
}

/// What runs inside the container: `kiln debug env`, a registry of kiln's own on the
/// container's loopback for the cache, the busybox base imported, then the example built
/// twice (cold with cache export; fresh state with cache import) to OCI archives in /out.
/// RUN steps use the container's network (`--network host`): the container is the boundary,
/// and it has neither /dev/net/tun nor setns for an isolated one.
const IN_CONTAINER: &str = r#"#!/bin/sh
set -e
export SOURCE_DATE_EPOCH=1700000000
kiln debug env > /out/env.txt 2>&1 || true
kiln registry serve --addr 127.0.0.1:5000 --no-fsync --root /tmp/reg > /out/registry.log 2>&1 &
i=0; while ! grep -q "listening on" /out/registry.log && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
cd /app
for run in 1 2; do
  rm -rf /var/lib/kiln
  kiln import /busybox -t busybox:latest > /dev/null
  if [ $run = 1 ]; then cache="--export-cache type=registry,ref=127.0.0.1:5000/app/cache,mode=max";
  else cache="--import-cache type=registry,ref=127.0.0.1:5000/app/cache"; fi
  kiln build --frontend dockerfile.v0 --local context=. --local dockerfile=. --opt target=test \
    --network host --allow network.host --progress plain --metadata-file /out/meta-$run.json \
    --output type=oci,dest=/out/app-$run.tar $cache > /out/build-$run.log 2>&1
done
"#;

/// A root filesystem for `podman run --rootfs`: busybox, kiln with the libraries it links,
/// a busybox tree to import as the base (`/busybox`), the example, and the script above.
fn kiln_rootfs(dir: &Path) {
    common::busybox_rootfs(dir);
    std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    for d in ["usr/local/bin", "root", "out", "var/tmp"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let kiln = Path::new(env!("CARGO_BIN_EXE_kiln"));
    std::fs::copy(kiln, dir.join("usr/local/bin/kiln")).unwrap();
    let ldd = Command::new("ldd").arg(kiln).output().unwrap();
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = dir.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(lib, &to).unwrap();
    }
    // Named as the fixture's, since the base's history records the imported dir's name.
    common::busybox_rootfs(&dir.join("busybox"));
    common::copy_dir(&common::workspace().join("examples"), &dir.join("app"));
    std::fs::write(dir.join("run-example.sh"), IN_CONTAINER).unwrap();
    std::fs::set_permissions(
        dir.join("run-example.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
}

/// The example built on the host as root with SOURCE_DATE_EPOCH: its image digest.
fn root_build_digest(f: &Fixture) -> String {
    let m = f.path("root-meta.json");
    let dest = format!("type=oci,dest={}", f.path("root.tar").display());
    let out = f.kiln_env(
        &[
            "build",
            "--frontend",
            "dockerfile.v0",
            "--local",
            "context=.",
            "--local",
            "dockerfile=.",
            "--opt",
            "target=test",
            "--progress",
            "plain",
            "--metadata-file",
            m.to_str().unwrap(),
            "--output",
            &dest,
        ],
        &[("SOURCE_DATE_EPOCH", EPOCH)],
    );
    assert!(out.status.success(), "root build: {}", stderr(&out));
    meta(&m)["containerimage.digest"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Runs the example inside `podman run` with `opts` (no --privileged, no added capability),
/// checks both builds made the root build's image, the warm one all from the cache, and
/// that the image runs under podman. Returns `kiln debug env`'s table from inside.
fn build_inside_podman(opts: &[&str]) -> String {
    require_root("building inside podman (root podman)");
    let conf = common::podman_conf();
    let f = Fixture::new();
    let want = root_build_digest(&f);
    let dir = shared_dir();
    let rootfs = dir.path().join("rootfs");
    kiln_rootfs(&rootfs);
    let run = Command::new("podman")
        .args(["run", "--rm", "--network=none"])
        .args(opts)
        .arg("--rootfs")
        .arg(&rootfs)
        .arg("/run-example.sh")
        .env("CONTAINERS_CONF", &conf)
        .output()
        .unwrap();
    let out = rootfs.join("out");
    let log = |n: &str| std::fs::read_to_string(out.join(n)).unwrap_or_default();
    assert!(
        run.status.success(),
        "podman run {opts:?}: {}\nbuild 1:\n{}\nbuild 2:\n{}\nenv:\n{}",
        stderr(&run),
        log("build-1.log"),
        log("build-2.log"),
        log("env.txt")
    );
    let m1 = meta(&out.join("meta-1.json"));
    let m2 = meta(&out.join("meta-2.json"));
    assert_eq!(m1["containerimage.digest"].as_str().unwrap(), want);
    assert_eq!(m2["containerimage.digest"].as_str().unwrap(), want);
    assert!(
        steps_with(&m2, "run").is_empty(),
        "the imported cache covers every step: ran {:?}",
        steps_with(&m2, "run")
    );
    let image = format!("oci-archive:{}", out.join("app-1.tar").display());
    let ran = Command::new("podman")
        .args(["run", "--rm", "--network=none", &image])
        .env("CONTAINERS_CONF", &conf)
        .output()
        .unwrap();
    assert!(
        ran.status.success() && String::from_utf8_lossy(&ran.stdout).contains("tests passed"),
        "podman run {image}: {}{}",
        String::from_utf8_lossy(&ran.stdout),
        stderr(&ran)
    );
    log("env.txt")
}

#[test]
fn inside_podman_with_proc_unmasked_builds_the_root_image_with_a_private_proc() {
    let env = build_inside_podman(&["--security-opt", "unmask=/proc/*"]);
    assert!(env.contains("kiln builds in mode rootless-userns"), "{env}");
    assert!(!env.contains("no fresh /proc"), "{env}");
}

#[test]
fn inside_podman_with_no_options_builds_the_root_image_and_says_proc_is_shared() {
    let env = build_inside_podman(&[]);
    assert!(env.contains("kiln builds in mode rootless-userns"), "{env}");
    assert!(
        env.contains("no fresh /proc") && env.contains("unmask=/proc/*"),
        "{env}"
    );
}
