//! `--ssh` and `RUN --mount=type=ssh` against a real OpenSSH agent, every `--secret` form,
//! and the `security.insecure` entitlement, through the `kiln` binary. The steps run the
//! host's own `ssh-add` (copied with its libraries into a busybox image) against the agent.
//! After each ssh build, no private-key bytes may be anywhere kiln wrote: the pushed image's
//! layers, the exported cache, the state dir, the build's output.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

/// An `ssh-agent` of the test's own, on a socket in a temp dir; stopped when dropped.
struct Agent {
    socket: PathBuf,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh-agent (openssh-client) is installed");
        for _ in 0..500 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(socket.exists(), "ssh-agent did not create its socket");
        Agent {
            socket,
            child,
            _dir: dir,
        }
    }

    fn add(&self, key: &Path) {
        let out = Command::new("ssh-add")
            .arg(key)
            .env("SSH_AUTH_SOCK", &self.socket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ssh-add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A generated ed25519 key: its path, its fingerprint as `ssh-add -l` prints it, and byte
/// strings only the private key holds (its seed, and base64 text lines of its private part).
struct Key {
    path: PathBuf,
    fingerprint: String,
    private_chunks: Vec<Vec<u8>>,
}

fn keygen(dir: &Path, name: &str, passphrase: &str) -> Key {
    for tool in [
        "ssh-keygen",
        "ssh-agent",
        "ssh-add",
        "ldd",
        "base64",
        "gzip",
    ] {
        require_program(tool);
    }
    let path = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", passphrase, "-C"])
        .arg(format!("kiln-e2e-{name}"))
        .arg("-f")
        .arg(&path)
        .status()
        .expect("ssh-keygen (openssh-client) is installed");
    assert!(st.success());
    let fp = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(path.with_extension("pub"))
        .output()
        .unwrap();
    let fingerprint = String::from_utf8_lossy(&fp.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    assert!(fingerprint.starts_with("SHA256:"), "{fingerprint}");
    let text = std::fs::read_to_string(&path).unwrap();
    let body: Vec<&str> = text.lines().filter(|l| !l.starts_with("-----")).collect();
    // The last full lines of the file encode the private part (the seed, then the comment).
    let mut private_chunks = Vec::new();
    for l in body.iter().rev().skip(1).take(2) {
        if l.len() >= 40 {
            private_chunks.push(l.as_bytes().to_vec());
        }
    }
    assert!(!private_chunks.is_empty(), "unexpected key file layout");
    if passphrase.is_empty() {
        // The raw seed too, in case anything wrote the key decoded.
        let decoded = base64_decode(&body.concat());
        let seed = ed25519_seed(&decoded).to_vec();
        assert!(contains(&decoded, &seed));
        private_chunks.push(seed);
    }
    // The search finds them where they are.
    for c in private_chunks.iter().take(1) {
        assert!(contains(text.as_bytes(), c));
    }
    Key {
        path,
        fingerprint,
        private_chunks,
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let mut c = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// The 32-byte seed of an unencrypted OpenSSH ed25519 private key (`openssh-key-v1`).
fn ed25519_seed(k: &[u8]) -> &[u8] {
    let magic = b"openssh-key-v1\0";
    assert!(k.starts_with(magic));
    let mut at = magic.len();
    let string = |at: &mut usize| -> &[u8] {
        let n = u32::from_be_bytes(k[*at..*at + 4].try_into().unwrap()) as usize;
        let s = &k[*at + 4..*at + 4 + n];
        *at += 4 + n;
        s
    };
    assert_eq!(string(&mut at), b"none", "the key has a cipher");
    string(&mut at); // kdf name
    string(&mut at); // kdf options
    let n = u32::from_be_bytes(k[at..at + 4].try_into().unwrap());
    at += 4;
    for _ in 0..n {
        string(&mut at); // public keys
    }
    let private = string(&mut at);
    let mut p = 8; // two check ints
    let pstring = |p: &mut usize| -> &[u8] {
        let n = u32::from_be_bytes(private[*p..*p + 4].try_into().unwrap()) as usize;
        let s = &private[*p + 4..*p + 4 + n];
        *p += 4 + n;
        s
    };
    assert_eq!(pstring(&mut p), b"ssh-ed25519");
    pstring(&mut p); // public key
    let secret = pstring(&mut p);
    assert_eq!(secret.len(), 64);
    &secret[..32]
}

/// The host's `ssh-add` and the shared libraries it loads, at their paths, under `root`.
fn copy_ssh_add(root: &Path) {
    let exe = Path::new("/usr/bin/ssh-add");
    let ldd = Command::new("ldd").arg(exe).output().unwrap();
    assert!(ldd.status.success(), "ldd /usr/bin/ssh-add");
    let mut files = vec![exe.to_path_buf()];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    for f in files {
        let dest = root.join(f.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&f, &dest).unwrap();
    }
}

/// A build context with `ssh-add` copied in and `dockerfile` (its first line `FROM busybox`).
fn project(f: &Fixture, name: &str, dockerfile: &str) -> PathBuf {
    let dir = f.path(name);
    copy_ssh_add(&dir.join("sshroot"));
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    dir
}

fn kiln(f: &Fixture, args: &[&str], env: &[(&str, &OsArg)], unset: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--root").arg(f.root()).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    for k in unset {
        c.env_remove(k);
    }
    c.output().unwrap()
}

type OsArg = std::ffi::OsStr;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every regular file under `dir`, gzip-compressed ones also decompressed.
fn contents_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let Ok(bytes) = std::fs::read(&p) else {
                    continue;
                };
                if bytes.starts_with(&[0x1f, 0x8b]) {
                    let z = Command::new("gzip").args(["-dc"]).arg(&p).output().unwrap();
                    out.push((p.with_extension("gunzipped"), z.stdout));
                }
                out.push((p, bytes));
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn assert_no_key_bytes(key: &Key, place: &str, files: &[(PathBuf, Vec<u8>)]) {
    assert!(!files.is_empty(), "{place}: nothing to search");
    for (path, bytes) in files {
        for chunk in &key.private_chunks {
            assert!(
                !contains(bytes, chunk),
                "{place}: private key bytes found in {}",
                path.display()
            );
        }
    }
}

/// The blobs of a pushed image (`skopeo copy` to a directory).
fn pulled_blobs(image: &str, into: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let out = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{image}"))
        .arg(format!("dir:{}", into.display()))
        .output()
        .expect("skopeo is installed (.ci/install)");
    assert!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    contents_under(into)
}

const SSH_DOCKERFILE: &str = "FROM busybox
COPY sshroot/ /
RUN --mount=type=ssh ssh-add -l > /root-keys.txt; echo \"root sees: $(cat /root-keys.txt) via $SSH_AUTH_SOCK\"; ls -l /run/buildkit
USER www-data
RUN --mount=type=ssh,id=app,uid=33,target=/tmp/agent echo \"www-data sees: $(ssh-add -l) via $SSH_AUTH_SOCK\"
";

/// Builds SSH_DOCKERFILE (push, local cache export) and checks what the steps saw and that
/// no private-key bytes are anywhere kiln wrote.
fn ssh_build_and_check(tag: &str, key: &Key, ssh: &[&str], env: &[(&str, &OsArg)], unset: &[&str]) {
    let f = Fixture::new();
    let reg = TestRegistry::kiln();
    let dir = project(&f, "ctx", SSH_DOCKERFILE);
    let image = format!("{}/ssh/{tag}:1", reg.addr);
    let cache = f.path("cache");
    let out_spec = format!("type=image,name={image},push=true");
    let cache_spec = format!("type=local,dest={},mode=max", cache.display());
    let mut args = vec![
        "build",
        dir.to_str().unwrap(),
        "--progress",
        "plain",
        "-o",
        &out_spec,
        "--export-cache",
        &cache_spec,
    ];
    for s in ssh {
        args.extend(["--ssh", s]);
    }
    let out = kiln(&f, &args, env, unset);
    let log = text(&out);
    assert!(out.status.success(), "build failed:\n{log}");
    assert!(
        log.contains(&format!("root sees: 256 {}", key.fingerprint))
            && log.contains("via /run/buildkit/ssh_agent.0"),
        "the root step did not list the key through the default target:\n{log}"
    );
    assert!(
        log.contains(&format!("www-data sees: 256 {}", key.fingerprint))
            && log.contains("via /tmp/agent"),
        "a step running as www-data did not reach the agent through its uid=33 mount:\n{log}"
    );
    assert_no_key_bytes(
        key,
        "build output",
        &[(PathBuf::from("output"), log.into_bytes())],
    );
    let blobs = pulled_blobs(&image, &f.path("pulled"));
    assert_no_key_bytes(key, "pushed image", &blobs);
    // The layers hold what the steps wrote, and no mount point of the agent.
    let listing: String = blobs
        .iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "gunzipped"))
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert!(
        listing.contains("root-keys.txt"),
        "the step's file is missing from the layers"
    );
    assert!(
        !listing.contains("run/buildkit") && !listing.contains("tmp/agent"),
        "an ssh mount point reached a layer"
    );
    assert_no_key_bytes(key, "exported cache", &contents_under(&cache));
    assert_no_key_bytes(key, "state dir", &contents_under(&f.root()));
}

#[test]
fn ssh_default_forwards_the_callers_agent_and_no_key_bytes_leave_it() {
    require_root("ssh_default_forwards_the_callers_agent_and_no_key_bytes_leave_it");
    let keys = tempfile::tempdir().unwrap();
    let key = keygen(keys.path(), "id_fwd", "");
    let agent = Agent::start();
    agent.add(&key.path);
    let sock = agent.socket.clone();
    ssh_build_and_check(
        "forwarded",
        &key,
        // `app` names the same agent by its socket.
        &["default", &format!("app={}", sock.display())],
        &[("SSH_AUTH_SOCK", sock.as_os_str())],
        &[],
    );
}

#[test]
fn ssh_key_files_are_served_by_an_agent_of_the_build_and_no_key_bytes_leave_it() {
    require_root("ssh_key_files_are_served_by_an_agent_of_the_build_and_no_key_bytes_leave_it");
    let keys = tempfile::tempdir().unwrap();
    let key = keygen(keys.path(), "id_file", "");
    let spec = format!("default={}", key.path.display());
    let app = format!("app={}", key.path.display());
    // No agent of the caller's: kiln starts one holding the key.
    ssh_build_and_check("keyfile", &key, &[&spec, &app], &[], &["SSH_AUTH_SOCK"]);
    // kiln's agent is gone with the build (it was told to stop; allow it to finish exiting).
    let agents_left = || -> Vec<String> {
        let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
        String::from_utf8_lossy(&ps.stdout)
            .lines()
            .filter(|l| l.starts_with("ssh-agent") && l.contains("kiln-ssh-"))
            .map(String::from)
            .collect()
    };
    for _ in 0..300 {
        if agents_left().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let left = agents_left();
    assert!(
        left.is_empty(),
        "kiln's ssh-agent outlived the build: {left:?}"
    );
}

#[test]
fn ssh_steps_hit_the_cache_whichever_agent_serves_the_id() {
    require_root("ssh_steps_hit_the_cache_whichever_agent_serves_the_id");
    let f = Fixture::new();
    let keys = tempfile::tempdir().unwrap();
    let key = keygen(keys.path(), "id_cache", "");
    let agent = Agent::start();
    agent.add(&key.path);
    let dir = project(
        &f,
        "ctx",
        "FROM busybox\nCOPY sshroot/ /\nRUN --mount=type=ssh ssh-add -l > /keys.txt\n",
    );
    let is_ssh_step = |n: &String| n.contains("ssh-add");
    let forwarded = format!("default={}", agent.socket.display());
    let first = f.build_dir(&dir, &["--ssh", &forwarded]);
    assert!(first.ran().iter().any(is_ssh_step), "{:?}", first.ran());
    // Another agent for the same id: the key holds the id, never where the agent lives.
    let from_file = format!("default={}", key.path.display());
    let second = f.build_dir(&dir, &["--ssh", &from_file]);
    assert!(
        second.cached().iter().any(is_ssh_step) && !second.ran().iter().any(is_ssh_step),
        "ran {:?}, cached {:?}",
        second.ran(),
        second.cached()
    );
}

#[test]
fn ssh_problems_are_clear_errors_before_anything_runs() {
    require_root("ssh_problems_are_clear_errors_before_anything_runs");
    let f = Fixture::new();
    let keys = tempfile::tempdir().unwrap();
    let locked = keygen(keys.path(), "id_locked", "a passphrase");
    let dir = project(
        &f,
        "ctx",
        "FROM busybox\nRUN true\nRUN --mount=type=ssh,id=deploy,required=true touch /ran\n",
    );
    let d = dir.to_str().unwrap();
    // A required agent nobody gave: the line and the flag to add.
    let out = kiln(
        &f,
        &["build", d, "--progress", "plain"],
        &[],
        &["SSH_AUTH_SOCK"],
    );
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains(":3:") || log.contains("Dockerfile:3"), "{log}");
    assert!(log.contains("--ssh deploy"), "{log}");
    // A passphrase-protected key: refused, saying so and what to do.
    let spec = format!("deploy={}", locked.path.display());
    let out = kiln(
        &f,
        &["build", d, "--progress", "plain", "--ssh", &spec],
        &[],
        &[],
    );
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("--ssh deploy"), "{log}");
    assert!(log.contains("passphrase"), "{log}");
    assert_no_key_bytes(
        &locked,
        "error output",
        &[(PathBuf::from("output"), log.into_bytes())],
    );
    // `--ssh default` without an agent to forward.
    let out = kiln(
        &f,
        &["build", d, "--progress", "plain", "--ssh", "deploy"],
        &[],
        &["SSH_AUTH_SOCK"],
    );
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("SSH_AUTH_SOCK is not set"), "{log}");
    // A path where an id belongs.
    let out = kiln(
        &f,
        &["build", d, "--ssh", locked.path.to_str().unwrap()],
        &[],
        &[],
    );
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("--ssh"), "{log}");
    assert!(log.contains("default="), "{log}");
    // An optional agent nobody gave: the step runs without it.
    let dir = project(
        &f,
        "optional",
        "FROM busybox\nRUN --mount=type=ssh echo \"agent: ${SSH_AUTH_SOCK:-none}\"; test ! -e /run/buildkit/ssh_agent.0\n",
    );
    let out = kiln(
        &f,
        &["build", dir.to_str().unwrap(), "--progress", "plain"],
        &[],
        &["SSH_AUTH_SOCK"],
    );
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("agent: none"), "{log}");
}

// --- --secret forms ---------------------------------------------------------------------

/// Builds a step that checks the secret `id` (file `/run/secrets/id`) against `value`'s
/// sha256, with `secret` as the `--secret` value and `env` for kiln.
fn secret_build(secret: &str, value: &str, env: &[(&str, &OsArg)], unset: &[&str]) {
    let f = Fixture::new();
    let dir = f.path("ctx");
    std::fs::create_dir_all(&dir).unwrap();
    let sum = sha256_hex(value.as_bytes());
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM busybox\nRUN --mount=type=secret,id=s,required=true \
             test \"$(sha256sum < /run/secrets/s | cut -d' ' -f1)\" = {sum} && echo secret-matches\n"
        ),
    )
    .unwrap();
    let out = kiln(
        &f,
        &[
            "build",
            dir.to_str().unwrap(),
            "--progress",
            "plain",
            "--secret",
            secret,
        ],
        env,
        unset,
    );
    let log = text(&out);
    assert!(out.status.success(), "--secret {secret}:\n{log}");
    assert!(log.contains("secret-matches"), "--secret {secret}:\n{log}");
    assert!(
        !log.contains(value),
        "the secret value is in the output:\n{log}"
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn secret_file(value: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("secret.txt");
    std::fs::write(&p, value).unwrap();
    (d, p)
}

#[test]
fn secret_id_src_reads_a_file() {
    require_root("secret_id_src_reads_a_file");
    let (_d, p) = secret_file("file-secret-5d1c");
    secret_build(
        &format!("id=s,src={}", p.display()),
        "file-secret-5d1c",
        &[],
        &[],
    );
}

#[test]
fn secret_id_source_reads_a_file() {
    require_root("secret_id_source_reads_a_file");
    let (_d, p) = secret_file("source-secret-77ab");
    secret_build(
        &format!("id=s,source={}", p.display()),
        "source-secret-77ab",
        &[],
        &[],
    );
}

#[test]
fn secret_type_file_reads_a_file() {
    require_root("secret_type_file_reads_a_file");
    let (_d, p) = secret_file("typed-file-secret-0c3e");
    secret_build(
        &format!("type=file,id=s,src={}", p.display()),
        "typed-file-secret-0c3e",
        &[],
        &[],
    );
}

#[test]
fn secret_id_env_reads_a_variable() {
    require_root("secret_id_env_reads_a_variable");
    let v = std::ffi::OsStr::new("env-secret-91f0");
    secret_build(
        "id=s,env=KILN_E2E_TOKEN",
        "env-secret-91f0",
        &[("KILN_E2E_TOKEN", v)],
        &[],
    );
}

#[test]
fn secret_type_env_reads_a_variable() {
    require_root("secret_type_env_reads_a_variable");
    let v = std::ffi::OsStr::new("typed-env-secret-2b44");
    secret_build(
        "type=env,id=s,env=KILN_E2E_TYPED",
        "typed-env-secret-2b44",
        &[("KILN_E2E_TYPED", v)],
        &[],
    );
}

#[test]
fn secret_bare_id_reads_the_variable_of_that_name_else_the_file() {
    require_root("secret_bare_id_reads_the_variable_of_that_name_else_the_file");
    let v = std::ffi::OsStr::new("bare-env-secret-6e12");
    secret_build("id=s", "bare-env-secret-6e12", &[("s", v)], &[]);
    // No variable `s`: the file `s` (relative to kiln's working directory, as buildx).
    let f = Fixture::new();
    let dir = f.path("ctx");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("s"), "bare-file-secret-a8d0").unwrap();
    let sum = sha256_hex(b"bare-file-secret-a8d0");
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM busybox\nRUN --mount=type=secret,id=s,required=true \
             test \"$(sha256sum < /run/secrets/s | cut -d' ' -f1)\" = {sum} && echo secret-matches\n"
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(f.root())
        .args(["build", ".", "--progress", "plain", "--secret", "id=s"])
        .current_dir(&dir)
        .env_remove("s")
        .output()
        .unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("secret-matches"), "{log}");
}

#[test]
fn secret_mounted_as_an_environment_variable_of_the_step() {
    require_root("secret_mounted_as_an_environment_variable_of_the_step");
    let f = Fixture::new();
    let dir = f.path("ctx");
    std::fs::create_dir_all(&dir).unwrap();
    let value = "step-env-secret-3f7a";
    let sum = sha256_hex(value.as_bytes());
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM busybox\nRUN --mount=type=secret,id=tok,env=API_TOKEN \
             test \"$(printf %s \"$API_TOKEN\" | sha256sum | cut -d' ' -f1)\" = {sum} \
             && test ! -e /run/secrets/tok && echo env-secret-matches\n\
             RUN echo \"later: ${{API_TOKEN:-unset}}\"\n"
        ),
    )
    .unwrap();
    let (_d, p) = secret_file(value);
    let out = kiln(
        &f,
        &[
            "build",
            dir.to_str().unwrap(),
            "--progress",
            "plain",
            "--secret",
            &format!("id=tok,src={}", p.display()),
        ],
        &[],
        &[],
    );
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("env-secret-matches"), "{log}");
    // The variable lives only in the step that mounts it.
    assert!(log.contains("later: unset"), "{log}");
}

#[test]
fn bad_secret_values_name_the_flag() {
    let f = Fixture::new();
    for (bad, needle) in [
        ("src=/x", "missing id="),
        ("id=a,type=vault", "type=`vault`"),
        ("type=file,id=a,env=V", "type=file reads a file"),
    ] {
        let out = kiln(&f, &["build", ".", "--secret", bad], &[], &[]);
        let log = text(&out);
        assert!(!out.status.success(), "{bad}: {log}");
        assert!(
            log.contains("--secret") && log.contains(needle),
            "{bad}: {log}"
        );
    }
}

// --- security.insecure ------------------------------------------------------------------

fn cap_eff(status: &str) -> Option<String> {
    status
        .lines()
        .find(|l| l.contains("CapEff:"))
        .and_then(|l| l.split("CapEff:").nth(1))
        .map(|v| v.split_whitespace().next().unwrap_or_default().to_owned())
}

#[test]
fn run_security_insecure_is_refused_without_allow_and_privileged_with_it() {
    require_root("run_security_insecure_is_refused_without_allow_and_privileged_with_it");
    let f = Fixture::new();
    let dir = f.path("ctx");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox\nRUN echo sandbox-$(grep CapEff /proc/self/status)\n\
         RUN --security=insecure echo insecure-$(grep CapEff /proc/self/status)\n",
    )
    .unwrap();
    let d = dir.to_str().unwrap();
    let out = kiln(&f, &["build", d, "--progress", "plain"], &[], &[]);
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("entitlement security.insecure is not allowed"),
        "{log}"
    );
    assert!(log.contains("--allow security.insecure"), "{log}");
    assert!(log.contains(":3:") || log.contains("Dockerfile:3"), "{log}");
    assert!(
        !log.contains("sandbox-CapEff"),
        "a step ran before the refusal:\n{log}"
    );
    // network.host does not grant it.
    let out = kiln(
        &f,
        &["build", d, "--progress", "plain", "--allow", "network.host"],
        &[],
        &[],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let out = kiln(
        &f,
        &[
            "build",
            d,
            "--progress",
            "plain",
            "--allow",
            "security.insecure",
        ],
        &[],
        &[],
    );
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let line = |prefix: &str| {
        log.lines()
            .find(|l| l.contains(prefix))
            .and_then(cap_eff)
            .unwrap_or_else(|| panic!("no {prefix} line:\n{log}"))
    };
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let own = cap_eff(&own).unwrap();
    assert_eq!(
        line("insecure-CapEff"),
        own,
        "the insecure step lacks capabilities kiln has:\n{log}"
    );
    assert_ne!(
        line("sandbox-CapEff"),
        own,
        "the sandboxed step has every capability:\n{log}"
    );
}
