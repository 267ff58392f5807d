//! A private Docker daemon for a test: Debian's `dockerd` (package `docker.io`) with its data,
//! exec root, pid file and API socket in a temp dir, no bridge network and no iptables rules
//! (nothing on the host changes). It starts its own containerd (`/usr/bin/containerd`) under
//! the exec root, and runs containers with `runc`. Killed (and waited for) when dropped.
//!
//! Storage is `vfs`, not overlay2: on the machines the tests run on, overlay2 containers
//! failed to start about one `docker run` in five under load (runc: `exec: "cat":
//! executable file not found in $PATH`, dockerd: `Stat .../merged/dev: no such file`) while
//! the same image ran every time on vfs. The test images are a few MB, so copying is cheap.
//!
//! Containers it runs need `--network none` (there is no bridge).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long dockerd may take to answer `/_ping` (it starts containerd first; the machine is
/// shared, so be generous: this bounds a hang, it is no timing check).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A running private dockerd.
pub struct Dockerd {
    child: Child,
    dir: tempfile::TempDir,
    tcp: Option<String>,
}

impl Dockerd {
    /// Starts dockerd in a fresh temp dir and waits until its API answers `GET /_ping`.
    /// Fails the calling test, with dockerd's log, when it does not come up.
    #[track_caller]
    pub fn start() -> Self {
        Self::start_with(false, false)
    }

    /// [`Dockerd::start`], its API also served over plain TCP on a loopback port
    /// ([`Dockerd::tcp_host`]), as a TLS-less `docker:dind` service serves it.
    #[track_caller]
    pub fn start_with_tcp() -> Self {
        Self::start_with(true, false)
    }

    /// [`Dockerd::start`], its API also served over TCP with TLS on a loopback port
    /// (`--tlsverify`: clients present a certificate of its CA), as `docker:dind` serves it
    /// by default. The client's `ca.pem`, `cert.pem` and `key.pem` are in
    /// [`Dockerd::client_certs`] (`DOCKER_CERT_PATH`); made with openssl for this daemon.
    #[track_caller]
    pub fn start_with_tls() -> Self {
        Self::start_with(true, true)
    }

    #[track_caller]
    fn start_with(tcp: bool, tls: bool) -> Self {
        super::require_root("a private dockerd");
        let dockerd = super::require_program("dockerd");
        super::require_program("containerd");
        // Short paths: the socket path must fit in a sockaddr_un (108 bytes).
        let dir = tempfile::Builder::new()
            .prefix("kiln-dockerd.")
            .tempdir_in("/tmp")
            .unwrap();
        let log = std::fs::File::create(dir.path().join("dockerd.log")).unwrap();
        let p = |rel: &str| dir.path().join(rel);
        let tcp = tcp.then(|| {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            format!("tcp://127.0.0.1:{port}")
        });
        let mut command = Command::new(dockerd);
        if let Some(host) = &tcp {
            command.arg("-H").arg(host);
        }
        if tls {
            let certs = make_certs(dir.path());
            command
                .arg("--tlsverify")
                .arg("--tlscacert")
                .arg(certs.join("ca.pem"))
                .arg("--tlscert")
                .arg(certs.join("server-cert.pem"))
                .arg("--tlskey")
                .arg(certs.join("server-key.pem"));
        }
        let child = command
            .arg("--bridge=none")
            .arg("--iptables=false")
            .arg("--ip6tables=false")
            .arg("--ip-masq=false")
            .arg("--storage-driver=vfs")
            .arg("--data-root")
            .arg(p("data"))
            .arg("--exec-root")
            .arg(p("exec"))
            .arg("--pidfile")
            .arg(p("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", p("docker.sock").display()))
            // No docker-proxy processes (there are no published ports anyway).
            .arg("--userland-proxy=false")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting dockerd");
        let mut d = Dockerd { child, dir, tcp };
        d.wait_ready();
        d
    }

    #[track_caller]
    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "dockerd exited ({status}) before answering:\n{}",
                    self.log()
                );
            }
            let ping = Command::new("curl")
                .args(["-sf", "--max-time", "5", "--unix-socket"])
                .arg(self.socket())
                .arg("http://localhost/_ping")
                .output();
            if ping.is_ok_and(|o| o.status.success() && o.stdout == b"OK") {
                return;
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "dockerd did not answer /_ping in {}s:\n{}",
                START_TIMEOUT.as_secs(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// `DOCKER_HOST` for this daemon: `unix://SOCKET`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// `DOCKER_HOST` for this daemon's TCP listener (`tcp://127.0.0.1:PORT`), when it was
    /// started with one.
    pub fn tcp_host(&self) -> Option<&str> {
        self.tcp.as_deref()
    }

    /// The client certificates of a daemon started with TLS: `ca.pem`, `cert.pem`, `key.pem`.
    pub fn client_certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// What dockerd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// Runs Debian's docker CLI (`/usr/bin/docker`) against this daemon, with its own
    /// config dir (no user settings, no credential helpers).
    pub fn docker(&self, args: &[&str]) -> Output {
        let config = self.dir.path().join("cli");
        std::fs::create_dir_all(&config).unwrap();
        Command::new(docker_cli())
            .args(args)
            .env("DOCKER_HOST", self.host())
            .env("DOCKER_CONFIG", &config)
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_TLS_VERIFY")
            .env_remove("DOCKER_CERT_PATH")
            .output()
            .expect("running the docker CLI")
    }

    /// Its temp dir (data root, exec root, socket, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl in
/// `dir/certs` (EC keys: quick to make).
#[track_caller]
fn make_certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new(super::require_program("openssl"))
            .args(args)
            .current_dir(&certs)
            .output()
            .expect("running openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca-key.pem", "-out", "ca.pem"],
            &["-days", "2", "-subj", "/CN=kiln test CA"],
        ]
        .concat(),
    );
    std::fs::write(
        certs.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(certs.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, key, ext) in [
        ("server-cert.pem", "server-key.pem", "server.ext"),
        ("cert.pem", "key.pem", "client.ext"),
    ] {
        let csr = format!("{name}.csr");
        openssl(
            &[
                &["req"][..],
                &ec,
                &["-keyout", key, "-out", &csr, "-subj", "/CN=kiln test"],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext,
            "-out",
            name,
        ]);
    }
    certs
}

/// Debian's docker CLI, `/usr/bin/docker` from `docker.io` (a `docker` earlier on `PATH` may
/// be another build).
#[track_caller]
pub fn docker_cli() -> PathBuf {
    super::require_program("/usr/bin/docker")
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM: dockerd stops its containers and its containerd, then unmounts.
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Mounts dockerd left (the exec root, a container's) would keep the temp dir.
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(self.dir.path().join("data"))
            .output();
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(self.dir.path().join("exec"))
            .output();
    }
}
