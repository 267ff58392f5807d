//! The multi-architecture bases, as root: the arm64 busybox is an aarch64 binary that runs
//! here through the registered qemu-aarch64 handler, and the pushed index names both
//! platforms and resolves to images whose configs say the same.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use kiln_test_env::multiarch::{busybox_rootfs, ensure_binfmt, push_busybox_index};
use kiln_test_env::{require_program, require_root};

/// The ELF `e_machine` of a little-endian binary.
fn elf_machine(path: &Path) -> u16 {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF", "{} is not ELF", path.display());
    u16::from_le_bytes([bytes[18], bytes[19]])
}

#[test]
fn busybox_of_each_architecture_runs_here() {
    require_root("multiarch");
    let amd64 = busybox_rootfs("amd64");
    let arm64 = busybox_rootfs("arm64");
    assert_eq!(elf_machine(&amd64.join("bin/busybox")), 62, "x86-64");
    assert_eq!(elf_machine(&arm64.join("bin/busybox")), 183, "aarch64");
    assert!(arm64.join("bin/sh").symlink_metadata().is_ok());
    // Cached: a second call gives the same tree.
    assert_eq!(busybox_rootfs("arm64"), arm64);

    ensure_binfmt("arm64").unwrap();
    // Inside a chroot of the arm64 tree: the emulator is nowhere in that root, so this
    // runs only with the handler's F flag.
    let out = Command::new("chroot")
        .arg(&arm64)
        .args(["/bin/uname", "-m"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "aarch64");
}

/// Debian's `docker-registry` on a free loopback port, killed when dropped.
struct Registry {
    addr: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn registry() -> Registry {
    require_program("docker-registry");
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..200 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Registry {
        addr,
        child,
        _dir: dir,
    }
}

fn skopeo_inspect(args: &[&str], image: &str) -> serde_json::Value {
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .args(args)
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo inspect {args:?} {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn pushed_index_names_both_platforms() {
    let reg = registry();
    let image = push_busybox_index(&reg.addr, "base/busybox");
    assert_eq!(image, format!("{}/base/busybox:latest", reg.addr));
    let index = skopeo_inspect(&["--raw"], &image);
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{index}"
    );
    let platforms: Vec<(String, String)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["platform"]["os"].as_str().unwrap().to_owned(),
                m["platform"]["architecture"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        platforms,
        [
            ("linux".into(), "amd64".into()),
            ("linux".into(), "arm64".into())
        ]
    );
    for arch in ["amd64", "arm64"] {
        let config = skopeo_inspect(&["--config", "--override-arch", arch], &image);
        assert_eq!(config["architecture"], arch, "{config}");
        assert_eq!(config["os"], "linux", "{config}");
    }
}
