//! `RUN` steps get a network of their own by default: the runner's loopback is out of reach,
//! the package registries this machine reaches are not. The host's network needs the
//! `network.host` entitlement. A pids limit contains a fork bomb; a killed build leaves no
//! slirp4netns behind. Needs root, slirp4netns (.ci/install) and the package registries
//! (deb.debian.org, pypi.org, registry.npmjs.org); a check that cannot run fails.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Imports `netbox:latest`: busybox plus the host's `curl`, its libraries and the CA bundle
/// (busybox-static's `wget` crashes in its resolver here).
fn import_netbox(f: &Fixture) {
    let root = f.path("netbox");
    busybox_rootfs(&root);
    let ldd = Command::new("ldd").arg("/usr/bin/curl").output().unwrap();
    assert!(ldd.status.success(), "curl is installed on the host");
    let mut files = vec![
        "/usr/bin/curl".to_string(),
        "/etc/ssl/certs/ca-certificates.crt".into(),
    ];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
            files.push(p.to_string());
        }
    }
    for file in files {
        let dest = root.join(file.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(std::fs::canonicalize(&file).unwrap(), &dest).unwrap();
    }
    let out = f.kiln(&["import", root.to_str().unwrap(), "-t", "netbox:latest"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn project(f: &Fixture, name: &str, dockerfile: &str) -> std::path::PathBuf {
    let dir = f.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    dir
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn run_cannot_reach_host_loopback_but_resolves_and_fetches_from_package_registries() {
    require_root("run_cannot_reach_host_loopback_but_resolves_and_fetches_from_package_registries");
    let f = Fixture::new();
    import_netbox(&f);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    let dir = project(
        &f,
        "isolated",
        "FROM netbox:latest\n\
         ARG PORT\n\
         RUN head -n 1 /etc/resolv.conf > /r-dns\n\
         RUN (nc -w 3 127.0.0.1 $PORT </dev/null && echo connected || echo refused) > /r-loopback\n\
         RUN (nc -w 3 10.0.2.2 $PORT </dev/null && echo connected || echo refused) > /r-gateway\n\
         ARG LAN\n\
         ARG LAN_PORT\n\
         RUN (nc -w 3 $LAN $LAN_PORT </dev/null && echo connected || echo refused) > /r-lan\n\
         RUN (nc -w 3 169.254.169.254 80 </dev/null && echo connected || echo refused) > /r-metadata\n\
         RUN nslookup deb.debian.org > /r-nslookup\n\
         RUN curl -fsS --max-time 60 -o /r-debian http://deb.debian.org/debian/dists/bookworm/Release\n\
         RUN curl -fsS --max-time 60 -o /r-pypi https://pypi.org/simple/pip/\n\
         RUN curl -fsS --max-time 60 -o /r-npm https://registry.npmjs.org/left-pad\n",
    );
    let out = f.path("isolated-out");
    let o = format!("type=local,dest={}", out.display());
    // A runner service bound to every address, reached through the host's LAN address.
    let all = TcpListener::bind("0.0.0.0:0").unwrap();
    all.set_nonblocking(true).unwrap();
    let lan_port = format!("LAN_PORT={}", all.local_addr().unwrap().port());
    let lan = format!("LAN={}", host_lan_address());
    let p = format!("PORT={port}");
    f.build_dir(
        &dir,
        &[
            "--build-arg",
            &p,
            "--build-arg",
            &lan,
            "--build-arg",
            &lan_port,
            "--output",
            &o,
        ],
    );
    let read = |n: &str| std::fs::read_to_string(out.join(n)).unwrap();
    assert_eq!(read("r-dns"), "nameserver 10.0.2.3\n");
    assert_eq!(read("r-loopback"), "refused\n");
    assert_eq!(read("r-gateway"), "refused\n");
    assert_eq!(read("r-lan"), "refused\n");
    assert_eq!(read("r-metadata"), "refused\n");
    assert!(l.accept().is_err(), "nothing reached the host's listener");
    assert!(
        all.accept().is_err(),
        "nothing reached the all-address listener"
    );
    assert!(read("r-nslookup").contains("deb.debian.org"));
    assert!(read("r-debian").contains("Codename: bookworm"));
    assert!(read("r-pypi").contains("pip-"));
    assert!(read("r-npm").contains("\"left-pad\""), "{}", read("r-npm"));
}

/// The host's first global IPv4 address.
fn host_lan_address() -> String {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let cidr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .expect("the host has a global IPv4 address");
    cidr.split('/').next().unwrap().to_string()
}

/// A listener on the host's loopback that records what one connection sent.
fn loopback_server() -> (u16, std::thread::JoinHandle<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        got
    });
    (port, server)
}

#[test]
fn host_network_needs_the_network_host_entitlement_and_then_reaches_host_loopback() {
    require_root("host_network_needs_the_network_host_entitlement_and_then_reaches_host_loopback");
    let f = Fixture::new();
    let dir = project(
        &f,
        "run-host",
        "FROM busybox:latest\nARG PORT\nRUN --network=host echo from-run-flag | nc -w 5 127.0.0.1 $PORT\n",
    );
    // Without the entitlement: refused before anything runs, naming the line and the flag.
    let (out, _) = f.build_dir_raw(&dir, &["--build-arg", "PORT=1"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("Dockerfile:3"), "{err}");
    assert!(
        err.contains("RUN --network=host needs the network.host entitlement"),
        "{err}"
    );
    assert!(err.contains("--allow network.host"), "{err}");

    let (port, server) = loopback_server();
    let p = format!("PORT={port}");
    f.build_dir(&dir, &["--build-arg", &p, "--allow", "network.host"]);
    assert_eq!(server.join().unwrap(), "from-run-flag\n");

    // `--network host` on the command line: the same entitlement.
    let dir = project(
        &f,
        "cli-host",
        "FROM busybox:latest\nARG PORT\nRUN echo from-cli-flag | nc -w 5 127.0.0.1 $PORT\n",
    );
    let (out, _) = f.build_dir_raw(&dir, &["--build-arg", "PORT=1", "--network", "host"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("--network"), "{err}");
    assert!(err.contains("--allow network.host"), "{err}");

    let (port, server) = loopback_server();
    let p = format!("PORT={port}");
    f.build_dir(
        &dir,
        &[
            "--build-arg",
            &p,
            "--network",
            "host",
            "--allow",
            "network.host",
        ],
    );
    assert_eq!(server.join().unwrap(), "from-cli-flag\n");

    // A misspelt entitlement names the flag.
    let (out, _) = f.build_dir_raw(&dir, &["--allow", "network.hots"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--allow"), "{}", stderr(&out));
}

#[test]
fn a_fork_bomb_in_run_hits_the_pids_limit() {
    require_root("a_fork_bomb_in_run_hits_the_pids_limit");
    let f = Fixture::new();
    // A bounded bomb (at most ~511 processes, so the machine survives a missing limit):
    // each level forks two copies of itself; leaves sleep so the tree is alive at once.
    let dir = project(
        &f,
        "bomb",
        "FROM busybox:latest\n\
         RUN b() { if [ $1 -gt 0 ]; then b $(($1-1)) & b $(($1-1)) & wait; else sleep 3; fi; }; \
             b 8 2> /r-bomb; echo survived > /r-done\n",
    );
    let out = f.path("bomb-out");
    let o = format!("type=local,dest={}", out.display());
    let (run, meta) = f.build_dir_raw(&dir, &["--output", &o, "--pids-limit", "64"]);
    let _ = Build::from(run, &meta);
    let bomb = std::fs::read_to_string(out.join("r-bomb")).unwrap();
    assert!(bomb.contains("can't fork"), "{bomb}");
    assert_eq!(
        std::fs::read_to_string(out.join("r-done")).unwrap(),
        "survived\n"
    );

    // KILN_PIDS_LIMIT is the same knob; a bad value names the flag.
    let bad = f.kiln_env(
        &["build", dir.to_str().unwrap()],
        &[("KILN_PIDS_LIMIT", "lots")],
    );
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("--pids-limit"), "{}", stderr(&bad));
}

fn children_named(parent: u32, comm: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid: Option<u32> = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if head.ends_with(&format!("({comm}")) && ppid == Some(parent) {
            found.push(e.file_name().to_string_lossy().parse().unwrap());
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie shows state Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < limit, "gave up waiting: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_build_leaves_no_slirp4netns_behind_and_its_cgroup_is_reclaimed() {
    require_root("a_killed_build_leaves_no_slirp4netns_behind_and_its_cgroup_is_reclaimed");
    let f = Fixture::new();
    let dir = project(&f, "killed", "FROM busybox:latest\nRUN sleep 4747\n");
    let d = dir.to_str().unwrap();
    let mut kiln = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(f.root())
        .args(["build", d, "--progress", "plain", "--pids-limit", "100"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = kiln.id();
    let mut slirp = Vec::new();
    wait_until(
        "the step and its slirp4netns start",
        Duration::from_secs(120),
        || {
            slirp = children_named(pid, "slirp4netns");
            !slirp.is_empty() && running("sleep 4747")
        },
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    kiln.wait().unwrap();
    wait_until("slirp4netns exits", Duration::from_secs(30), || {
        slirp.iter().all(|p| !alive(*p))
    });
    wait_until("the step's processes exit", Duration::from_secs(30), || {
        !running("sleep 4747")
    });
    // The killed build's (now empty) pids cgroup is reclaimed by the next build with a limit.
    let parent = ["/sys/fs/cgroup/pids/kiln", "/sys/fs/cgroup/kiln"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .expect("a pids cgroup hierarchy");
    let leftovers = || -> Vec<String> {
        std::fs::read_dir(parent)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("{pid}-")))
            .collect()
    };
    assert_eq!(leftovers().len(), 1, "the killed build's cgroup is left");
    let dir = project(&f, "after", "FROM busybox:latest\nRUN true\n");
    f.build_dir(&dir, &["--pids-limit", "100"]);
    assert_eq!(leftovers(), Vec::<String>::new(), "reclaimed");
}

fn running(cmdline: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim() == cmdline)
            .unwrap_or(false)
    })
}
