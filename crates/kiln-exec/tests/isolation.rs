//! A step's default network (its own namespace, outbound through slirp4netns), on both
//! backends. Needs root and slirp4netns (.ci/install); the
//! registry checks need the package registries this machine reaches (deb.debian.org, pypi.org,
//! registry.npmjs.org). Each check that cannot run fails.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use common::*;
use kiln_exec::{CollectedOutput, Executor, ExitStatus, NamespaceExecutor, Network, RuncExecutor};

fn expect_ok(status: ExitStatus, out: &CollectedOutput) {
    assert_eq!(
        status,
        ExitStatus::Code(0),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout_text(),
        out.stderr_text()
    );
}

/// Copies the host's `curl`, the shared libraries it loads and the CA bundle into `rootfs`, so
/// a step can fetch over HTTPS (busybox-static's `wget` crashes in its resolver here).
fn install_host_curl(rootfs: &Path) {
    let ldd = Command::new("ldd").arg("/usr/bin/curl").output().unwrap();
    assert!(ldd.status.success(), "curl is installed on the host");
    let mut files = vec![
        "/usr/bin/curl".to_string(),
        "/etc/ssl/certs/ca-certificates.crt".into(),
    ];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // `libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)` or `/lib64/ld-linux... (0x...)`
        if let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) {
            files.push(path.to_string());
        }
    }
    for f in files {
        let real = std::fs::canonicalize(&f).unwrap();
        let dest = rootfs.join(f.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&real, &dest).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
}

fn rootfs_with_curl() -> OverlayRootfs {
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    busybox_rootfs(&lower);
    install_host_curl(&lower);
    OverlayRootfs::with_lower(dir, lower)
}

/// The script every backend runs in its default network: loopback and the gateway's host
/// loopback mapping refused, DNS through the forwarder, HTTP and HTTPS from the registries.
fn isolation_script(port: u16, lan_port: u16) -> String {
    let lan = host_lan_address();
    format!(
        "head -n 1 /etc/resolv.conf
         nc -w 3 127.0.0.1 {port} </dev/null && echo loopback-connected || echo loopback-refused
         nc -w 3 10.0.2.2 {port} </dev/null && echo gateway-connected || echo gateway-refused
         nc -w 3 {lan} {lan_port} </dev/null && echo lan-connected || echo lan-refused
         nc -w 3 169.254.169.254 80 </dev/null && echo metadata-connected || echo metadata-refused
         nslookup deb.debian.org >/dev/null && echo resolved
         for url in http://deb.debian.org/debian/dists/bookworm/Release \
                    https://pypi.org/simple/pip/ https://registry.npmjs.org/left-pad; do
           curl -fsS --max-time 60 -o /dev/null -w '%{{http_code}}\\n' $url
         done"
    )
}

/// The host's first global IPv4 address (where a service bound to all addresses listens).
fn host_lan_address() -> String {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let addr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .expect("the host has a global IPv4 address");
    addr.split('/').next().unwrap().to_string()
}

fn assert_isolated_and_online(backend: &str, exec: &dyn Executor) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    // A runner service bound to every address, as many are.
    let all = TcpListener::bind("0.0.0.0:0").unwrap();
    all.set_nonblocking(true).unwrap();
    let lan_port = all.local_addr().unwrap().port();
    let fs = rootfs_with_curl();
    let spec = sh(&fs.merged, &isolation_script(port, lan_port));
    assert_eq!(spec.network, Network::Isolated, "the default network");
    let (st, out) = run(exec, &spec);
    expect_ok(st, &out);
    assert_eq!(
        out.stdout_text(),
        "nameserver 10.0.2.3\nloopback-refused\ngateway-refused\nlan-refused\nmetadata-refused\n\
         resolved\n200\n200\n200",
        "{backend}; stderr:\n{}",
        out.stderr_text()
    );
    assert!(
        l.accept().is_err(),
        "{backend}: nothing reached the host's loopback listener"
    );
    assert!(
        all.accept().is_err(),
        "{backend}: nothing reached the host's all-address listener"
    );
}

#[test]
fn root_isolated_network_refuses_host_loopback_and_fetches_from_package_registries() {
    require_root("root_isolated_network_refuses_host_loopback_and_fetches_from_package_registries");
    assert_isolated_and_online("kiln", &NamespaceExecutor::new());
}

#[test]
fn root_runc_isolated_network_refuses_host_loopback_and_fetches_from_package_registries() {
    require_root(
        "root_runc_isolated_network_refuses_host_loopback_and_fetches_from_package_registries",
    );
    assert_isolated_and_online("runc", &RuncExecutor::default());
}

#[test]
fn a_zero_pids_limit_is_refused() {
    let err = NamespaceExecutor::new()
        .with_pids_limit(Some(0))
        .unwrap_err();
    assert!(err.to_string().contains("at least 1"), "{err}");
}
