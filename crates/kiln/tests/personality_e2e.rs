//! RUN steps of a 32-bit platform see a 32-bit machine, as root, on an x86_64 machine (the
//! kernel runs linux/386 natively): a base index of linux/amd64 and linux/386 (the host's
//! static busybox under both labels) is pushed to kiln's registry, and `RUN uname -m` in
//!
//! - `kiln build --platform linux/386` prints `i686` (the step runs with `PER_LINUX32`),
//! - `--platform linux/amd64` prints `x86_64`,
//! - both platforms in one build give each its own, and
//! - `--isolation chroot` (with the host's network, which a chroot cannot leave) gives
//!   linux/386 `i686` too, and
//! - a base of Debian's real i386 busybox (32-bit x86 system calls) runs its RUN step under
//!   the default seccomp profile: `i686`, files listed and read, and a call the profile
//!   leaves out (`unshare`) refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{require_root, Build, TestRegistry};
use kiln_test_env::multiarch::push_busybox_index_of;

/// The registry, the base index on it, a build context and a scratch dir.
struct Setup {
    _reg: TestRegistry,
    ctx: PathBuf,
    tmp: tempfile::TempDir,
}

/// `None` (the test passes without checking) where the machine is not x86_64: only there
/// does the kernel run linux/386 binaries of the host's busybox natively.
fn setup(test: &str) -> Option<Setup> {
    setup_with(
        test,
        &[("amd64", "amd64"), ("386", "amd64")],
        "RUN uname -m > /arch && echo \"$TARGETPLATFORM\" > /platform",
    )
}

/// [`setup`] with a base index of `images` ((platform arch, busybox arch) pairs) and `run`
/// as the Dockerfile's steps after `FROM` and `ARG TARGETPLATFORM`.
fn setup_with(test: &str, images: &[(&str, &str)], run: &str) -> Option<Setup> {
    require_root(test);
    if std::env::consts::ARCH != "x86_64" {
        eprintln!("{test}: needs an x86_64 machine (linux/386 runs natively there)");
        return None;
    }
    let reg = TestRegistry::kiln();
    let base = push_busybox_index_of(&reg.addr, "base/busybox32", images);
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nARG TARGETPLATFORM\n{run}\n"),
    )
    .unwrap();
    Some(Setup {
        _reg: reg,
        ctx,
        tmp,
    })
}

impl Setup {
    /// `kiln build` of the context in the state dir `runner` with `extra` flags, its output
    /// to a local directory `out`; that directory.
    fn build(&self, runner: &str, out: &str, extra: &[&str]) -> PathBuf {
        let dest = self.tmp.path().join(out);
        let meta = self.tmp.path().join(format!("{out}-meta.json"));
        let d = self.ctx.display();
        let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--root")
            .arg(self.tmp.path().join(runner))
            .args(["build", "--frontend", "dockerfile.v0", "--local"])
            .arg(format!("context={d}"))
            .arg("--local")
            .arg(format!("dockerfile={d}"))
            .args(["--progress", "rawjson", "--metadata-file"])
            .arg(&meta)
            .args(extra)
            .arg("--output")
            .arg(format!("type=local,dest={}", dest.display()))
            .output()
            .unwrap();
        Build::from(output, &meta);
        dest
    }
}

/// The trimmed text of `dir/rel`.
fn read(dir: &Path, rel: &str) -> String {
    let path = dir.join(rel);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .trim()
        .to_owned()
}

#[test]
fn linux_386_steps_see_i686_and_amd64_steps_x86_64() {
    let Some(s) = setup("linux_386_steps_see_i686_and_amd64_steps_x86_64") else {
        return;
    };
    let out = s.build("runner", "i386", &["--platform", "linux/386"]);
    assert_eq!(read(&out, "platform"), "linux/386");
    assert_eq!(read(&out, "arch"), "i686");

    let out = s.build("runner", "amd64", &["--platform", "linux/amd64"]);
    assert_eq!(read(&out, "platform"), "linux/amd64");
    assert_eq!(read(&out, "arch"), "x86_64");

    // One build of both: each platform's RUN gets its own personality (a fresh state dir,
    // so the steps run rather than hit the cache of the builds above).
    let out = s.build("both", "both", &["--platform", "linux/386,linux/amd64"]);
    assert_eq!(read(&out, "linux_386/arch"), "i686");
    assert_eq!(read(&out, "linux_amd64/arch"), "x86_64");
}

#[test]
fn chroot_isolation_gives_linux_386_steps_i686() {
    let Some(s) = setup("chroot_isolation_gives_linux_386_steps_i686") else {
        return;
    };
    let out = s.build(
        "chroot-runner",
        "chroot-i386",
        // A chroot has no network namespace of its own to give the step.
        &[
            "--isolation",
            "chroot",
            "--network",
            "host",
            "--allow",
            "network.host",
            "--platform",
            "linux/386",
        ],
    );
    assert_eq!(read(&out, "platform"), "linux/386");
    assert_eq!(read(&out, "arch"), "i686");
}

#[test]
fn a_real_i386_base_runs_under_the_default_seccomp_profile() {
    let Some(s) = setup_with(
        "a_real_i386_base_runs_under_the_default_seccomp_profile",
        &[("386", "386")],
        "RUN uname -m > /arch && ls -l /bin/busybox > /ls && cat /etc/group > /group \\\n          && (unshare -U true 2> /unshare-err; echo $? > /unshare-rc)",
    ) else {
        return;
    };
    let out = s.build("runner", "real-i386", &["--platform", "linux/386"]);
    let elf = std::fs::read(out.join("bin/busybox")).unwrap();
    assert_eq!(&elf[..5], b"\x7fELF\x01", "the base's busybox is 32-bit");
    assert_eq!(read(&out, "arch"), "i686");
    assert!(
        read(&out, "ls").contains("/bin/busybox"),
        "{}",
        read(&out, "ls")
    );
    assert!(read(&out, "group").starts_with("root:x:0:"));
    assert_eq!(read(&out, "unshare-rc"), "1");
    assert!(
        read(&out, "unshare-err").contains("Operation not permitted"),
        "{}",
        read(&out, "unshare-err")
    );
}
