//! Which platforms this machine can run RUN steps for: the native one (from the kernel's
//! `uname` machine) and those emulated through binfmt_misc handlers (Debian's
//! `qemu-user-static`). A build checks [`PlatformSupport::can_run`] for every target
//! platform before any step runs; `kiln debug platforms` prints the whole probe.
//! `docs/platforms.md` describes what is read and the fixes given.

use std::path::{Path, PathBuf};

use kiln_oci::Platform;

/// Where the kernel mounts binfmt_misc.
pub const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

/// Overrides [`BINFMT_DIR`] for tests (a temp dir laid out like binfmt_misc).
pub const BINFMT_DIR_ENV: &str = "KILN_BINFMT_DIR";

/// The foreign platforms users commonly build for, in the order `kiln debug platforms`
/// reports them.
pub const COMMON_PLATFORMS: &[&str] = &[
    "linux/amd64",
    "linux/arm64",
    "linux/arm/v7",
    "linux/ppc64le",
    "linux/s390x",
    "linux/riscv64",
    "linux/386",
];

/// Why a binfmt_misc handler file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BinfmtError {
    /// The handler file could not be read.
    #[error("reading binfmt_misc handler {path}: {source}")]
    Read {
        /// The handler file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line of the handler file is not in the kernel's format.
    #[error("binfmt_misc handler {name}: line {line}: {message}")]
    Parse {
        /// The handler's name.
        name: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// One registered binfmt_misc handler, as the kernel shows it in
/// `/proc/sys/fs/binfmt_misc/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinfmtHandler {
    /// The handler's name (its file name), e.g. `qemu-aarch64`.
    pub name: String,
    /// Whether the handler is enabled.
    pub enabled: bool,
    /// The interpreter the kernel runs, e.g. `/usr/libexec/qemu-binfmt/aarch64-binfmt-P`.
    pub interpreter: Option<String>,
    /// The flags letters (`P`, `O`, `C`, `F`).
    pub flags: String,
    /// Offset of the magic in the file.
    pub offset: u64,
    /// The magic bytes (handlers matching by magic).
    pub magic: Option<Vec<u8>>,
    /// The mask applied before comparing with the magic.
    pub mask: Option<Vec<u8>>,
    /// The file extension (handlers matching by extension).
    pub extension: Option<String>,
}

impl BinfmtHandler {
    /// Parses the kernel's text of a handler file.
    pub fn parse(name: &str, text: &str) -> Result<Self, BinfmtError> {
        let err = |line: usize, message: String| BinfmtError::Parse {
            name: name.to_owned(),
            line,
            message,
        };
        let mut h = BinfmtHandler {
            name: name.to_owned(),
            enabled: false,
            interpreter: None,
            flags: String::new(),
            offset: 0,
            magic: None,
            mask: None,
            extension: None,
        };
        let mut saw_state = false;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            let value = value.trim();
            match key {
                "enabled" | "disabled" if value.is_empty() => {
                    h.enabled = key == "enabled";
                    saw_state = true;
                }
                "interpreter" => h.interpreter = Some(value.to_owned()),
                "flags:" => h.flags = value.to_owned(),
                "offset" => {
                    h.offset = value
                        .parse()
                        .map_err(|_| err(n, format!("offset `{value}` is not a number")))?;
                }
                "magic" => h.magic = Some(unhex(value).ok_or_else(|| err(n, bad_hex(value)))?),
                "mask" => h.mask = Some(unhex(value).ok_or_else(|| err(n, bad_hex(value)))?),
                "extension" => h.extension = Some(value.to_owned()),
                _ => return Err(err(n, format!("unexpected line `{line}`"))),
            }
        }
        if !saw_state {
            return Err(err(1, "no `enabled` or `disabled` line".into()));
        }
        Ok(h)
    }

    /// Whether the `F` (fix-binary) flag is set: the kernel opens the interpreter when the
    /// handler is registered, so it runs inside a container whose root lacks it.
    pub fn fix_binary(&self) -> bool {
        self.flags.contains('F')
    }

    /// The OCI platform whose ELF binaries this handler runs, read from the ELF header in
    /// its magic (class, byte order, `e_machine`); `None` for other handlers.
    pub fn platform(&self) -> Option<Platform> {
        if self.offset != 0 {
            return None;
        }
        elf_platform(self.magic.as_deref()?)
    }
}

fn bad_hex(value: &str) -> String {
    format!("`{value}` is not hexadecimal bytes")
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The OCI platform of ELF binaries starting with `magic` (at least the first 20 bytes of
/// an ELF header: class, byte order and `e_machine`); `None` when not ELF or unknown.
pub fn elf_platform(magic: &[u8]) -> Option<Platform> {
    if magic.len() < 20 || magic[..4] != *b"\x7fELF" {
        return None;
    }
    let (class64, little) = (magic[4] == 2, magic[5] == 1);
    let machine = if little {
        u16::from_le_bytes([magic[18], magic[19]])
    } else {
        u16::from_be_bytes([magic[18], magic[19]])
    };
    let (arch, variant) = match (machine, class64, little) {
        (62, true, true) => ("amd64", None),
        (3, false, true) => ("386", None),
        (183, true, true) => ("arm64", None),
        (40, false, true) => ("arm", Some("v7")),
        (21, true, true) => ("ppc64le", None),
        (21, true, false) => ("ppc64", None),
        (22, true, false) => ("s390x", None),
        (243, true, true) => ("riscv64", None),
        (8, true, true) => ("mips64le", None),
        (8, true, false) => ("mips64", None),
        (258, true, true) => ("loong64", None),
        _ => return None,
    };
    Some(linux(arch, variant))
}

/// A `linux` target platform as a user writes it (`linux/arm64`, `linux/arm/v7`).
fn linux(arch: &str, variant: Option<&str>) -> Platform {
    let s = match variant {
        Some(v) => format!("linux/{arch}/{v}"),
        None => format!("linux/{arch}"),
    };
    Platform::parse(&s).unwrap_or_else(|_| Platform::new("linux", arch, variant))
}

/// The OCI platform of a kernel `uname` machine name (`x86_64` → `linux/amd64`).
pub fn machine_platform(machine: &str) -> Option<Platform> {
    let arch = match machine {
        "x86_64" => "amd64",
        "i386" | "i486" | "i586" | "i686" => "386",
        "aarch64" | "arm64" => "arm64",
        m if m.starts_with("armv7") || m.starts_with("armv8l") => "arm",
        "ppc64le" => "ppc64le",
        "ppc64" => "ppc64",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "mips64" => "mips64",
        "loongarch64" => "loong64",
        _ => return None,
    };
    Some(linux(arch, (arch == "arm").then_some("v7")))
}

/// The name qemu-user-static gives the emulator (and its handler `qemu-NAME`) of a platform.
fn qemu_name(p: &Platform) -> Option<&'static str> {
    Some(match p.architecture.as_str() {
        "amd64" => "x86_64",
        "386" => "i386",
        "arm64" => "aarch64",
        "arm" => "arm",
        "ppc64le" => "ppc64le",
        "ppc64" => "ppc64",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "mips64le" => "mips64el",
        "mips64" => "mips64",
        "loong64" => "loongarch64",
        _ => return None,
    })
}

/// Whether an emulated or native platform serves a wanted one: same OS and architecture
/// (qemu-arm runs every 32-bit ARM variant; arm64 has only v8).
fn same_arch(have: &Platform, want: &Platform) -> bool {
    have.os == want.os && have.architecture == want.architecture
}

/// What this machine can run: the native platforms and the binfmt_misc handlers.
#[derive(Debug, Clone)]
pub struct PlatformSupport {
    /// The kernel's machine name (`uname -m`).
    pub machine: String,
    /// Platforms run without emulation: the machine's own, plus `linux/386` on amd64.
    pub native: Vec<Platform>,
    /// The binfmt_misc directory probed.
    pub binfmt_dir: PathBuf,
    /// Whether binfmt_misc is mounted there (it has a `status` file).
    pub binfmt_mounted: bool,
    /// Whether binfmt_misc as a whole is enabled (`status` reads `enabled`).
    pub binfmt_enabled: bool,
    /// The registered handlers, by name.
    pub handlers: Vec<BinfmtHandler>,
    /// Handler files that could not be read or parsed.
    pub errors: Vec<String>,
}

/// Probes this machine: `uname` and the binfmt_misc directory ([`BINFMT_DIR`], or
/// `$KILN_BINFMT_DIR` in tests).
pub fn platform_support() -> PlatformSupport {
    let dir = std::env::var_os(BINFMT_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BINFMT_DIR));
    PlatformSupport::probe(&uname_machine(), &dir)
}

/// The kernel's machine name, as `uname -m` prints it.
pub fn uname_machine() -> String {
    // SAFETY: uname fills the zeroed struct; the fields are NUL-terminated C strings.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return std::env::consts::ARCH.to_owned();
        }
        std::ffi::CStr::from_ptr(u.machine.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}

impl PlatformSupport {
    /// Probes the binfmt_misc directory `dir` for a machine named `machine`.
    pub fn probe(machine: &str, dir: &Path) -> Self {
        let mut native = Vec::new();
        if let Some(p) = machine_platform(machine) {
            if p.architecture == "amd64" {
                native.push(p);
                native.push(linux("386", None));
            } else {
                native.push(p);
            }
        }
        let status = std::fs::read_to_string(dir.join("status")).ok();
        let mut s = PlatformSupport {
            machine: machine.to_owned(),
            native,
            binfmt_dir: dir.to_path_buf(),
            binfmt_mounted: status.is_some(),
            binfmt_enabled: status.as_deref().map(str::trim) == Some("enabled"),
            handlers: Vec::new(),
            errors: Vec::new(),
        };
        if !s.binfmt_mounted {
            return s;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return s;
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n != "status" && n != "register")
            .collect();
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let parsed = std::fs::read_to_string(&path)
                .map_err(|source| BinfmtError::Read { path, source })
                .and_then(|text| BinfmtHandler::parse(&name, &text));
            match parsed {
                Ok(h) => s.handlers.push(h),
                Err(e) => s.errors.push(e.to_string()),
            }
        }
        s
    }

    /// Whether `p` runs natively here.
    pub fn is_native(&self, p: &Platform) -> bool {
        self.native.iter().any(|n| same_arch(n, p))
    }

    /// The handler that would run `p` (enabled or not), if any.
    pub fn handler_for(&self, p: &Platform) -> Option<&BinfmtHandler> {
        let mut found = self
            .handlers
            .iter()
            .filter(|h| h.platform().is_some_and(|hp| same_arch(&hp, p)));
        let first = found.clone().find(|h| h.enabled && h.fix_binary());
        first.or_else(|| found.next())
    }

    /// The platforms emulated by enabled handlers (each once), in handler order.
    pub fn emulated(&self) -> Vec<(Platform, &BinfmtHandler)> {
        let mut out: Vec<(Platform, &BinfmtHandler)> = Vec::new();
        if !self.binfmt_enabled {
            return out;
        }
        for h in self.handlers.iter().filter(|h| h.enabled) {
            if let Some(p) = h.platform() {
                if !self.is_native(&p) && !out.iter().any(|(q, _)| same_arch(q, &p)) {
                    out.push((p, h));
                }
            }
        }
        out
    }

    /// Whether RUN steps of platform `p` can run in a container here: `Ok` when native or
    /// emulated by an enabled handler with the `F` flag, else the exact fix.
    pub fn can_run(&self, p: &Platform) -> Result<(), String> {
        if self.is_native(p) {
            return Ok(());
        }
        let dir = self.binfmt_dir.display();
        let Some(qemu) = qemu_name(p) else {
            return Err(format!(
                "{p} is not native here (machine {}) and kiln knows no QEMU emulator for it",
                self.machine
            ));
        };
        let register = format!(
            "register its handler: `/lib/systemd/systemd-binfmt /usr/lib/binfmt.d/qemu-{qemu}.conf` \
             (or `update-binfmts --enable qemu-{qemu}` where binfmt-support is installed; \
             hosts running systemd register it at boot)"
        );
        if !self.binfmt_mounted {
            return Err(format!(
                "{p} needs QEMU emulation but binfmt_misc is not mounted at {dir}: run \
                 `mount -t binfmt_misc binfmt_misc {dir}`, `apt-get install qemu-user-static`, \
                 then {register}"
            ));
        }
        if !self.binfmt_enabled {
            return Err(format!(
                "{p} needs QEMU emulation but binfmt_misc is disabled: run `echo 1 > {dir}/status`"
            ));
        }
        let Some(h) = self.handler_for(p) else {
            return Err(format!(
                "{p} needs QEMU emulation but no binfmt_misc handler for it is registered in \
                 {dir}: run `apt-get install qemu-user-static`, then {register}"
            ));
        };
        if !h.enabled {
            return Err(format!(
                "{p}: the binfmt_misc handler {name} is disabled: run `echo 1 > {dir}/{name}`",
                name = h.name
            ));
        }
        if !h.fix_binary() {
            return Err(format!(
                "{p}: the binfmt_misc handler {name} lacks the F (fix-binary) flag, so the kernel \
                 looks for its interpreter {interp} inside the container's root at each exec, \
                 where it does not exist: re-register it with F: `echo -1 > {dir}/{name}`, then \
                 {register}",
                name = h.name,
                interp = h.interpreter.as_deref().unwrap_or("(none)"),
            ));
        }
        Ok(())
    }

    /// The probe as JSON, as `kiln debug platforms --format json` prints it.
    pub fn to_json(&self) -> serde_json::Value {
        let common: Vec<serde_json::Value> = COMMON_PLATFORMS
            .iter()
            .map(|s| {
                let p = common_platform(s);
                let r = self.can_run(&p);
                serde_json::json!({
                    "platform": s,
                    "native": self.is_native(&p),
                    "emulated": r.is_ok() && !self.is_native(&p),
                    "handler": self.handler_for(&p).map(|h| h.name.clone()),
                    "can_run": r.is_ok(),
                    "fix": r.err(),
                })
            })
            .collect();
        let handlers: Vec<serde_json::Value> = self
            .handlers
            .iter()
            .map(|h| {
                serde_json::json!({
                    "name": h.name,
                    "enabled": h.enabled,
                    "interpreter": h.interpreter,
                    "flags": h.flags,
                    "fix_binary": h.fix_binary(),
                    "platform": h.platform().map(|p| p.to_string()),
                })
            })
            .collect();
        serde_json::json!({
            "machine": self.machine,
            "native": self.native.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "emulated": self.emulated().iter().map(|(p, _)| p.to_string()).collect::<Vec<_>>(),
            "binfmt_misc": {
                "dir": self.binfmt_dir.display().to_string(),
                "mounted": self.binfmt_mounted,
                "enabled": self.binfmt_enabled,
                "handlers": handlers,
                "errors": self.errors,
            },
            "platforms": common,
        })
    }
}

/// One of [`COMMON_PLATFORMS`] as a platform.
fn common_platform(s: &str) -> Platform {
    Platform::parse(s).unwrap_or_else(|_| linux(s, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/sys/fs/binfmt_misc/qemu-aarch64` on Debian 12 after
    /// `/lib/systemd/systemd-binfmt /usr/lib/binfmt.d/qemu-aarch64.conf`.
    const QEMU_AARCH64: &str = "enabled
interpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P
flags: POF
offset 0
magic 7f454c460201010000000000000000000200b700
mask ffffffffffffff00fffffffffffffffffeffffff
";

    /// qemu-s390x's handler (big-endian `e_machine`), registered without the F flag.
    const QEMU_S390X_NO_F: &str = "enabled
interpreter /usr/libexec/qemu-binfmt/s390x-binfmt-P
flags: PO
offset 0
magic 7f454c4602020100000000000000000000020016
mask fffffffffffffffcfffffffffffffffffffeffff
";

    const QEMU_ARM: &str = "disabled
interpreter /usr/libexec/qemu-binfmt/arm-binfmt-P
flags: POF
offset 0
magic 7f454c4601010100000000000000000002002800
mask ffffffffffffff00fffffffffffffffffeffffff
";

    const JAR: &str = "enabled
interpreter /usr/bin/jexec
flags: 
extension .jar
";

    fn plat(s: &str) -> Platform {
        common_platform(s)
    }

    #[test]
    fn parses_the_aarch64_handler() {
        let h = BinfmtHandler::parse("qemu-aarch64", QEMU_AARCH64).unwrap();
        assert!(h.enabled);
        assert!(h.fix_binary());
        assert_eq!(h.flags, "POF");
        assert_eq!(
            h.interpreter.as_deref(),
            Some("/usr/libexec/qemu-binfmt/aarch64-binfmt-P")
        );
        assert_eq!(h.magic.as_ref().unwrap().len(), 20);
        assert_eq!(h.mask.as_ref().unwrap()[7], 0);
        assert_eq!(
            h.platform().unwrap().to_string(),
            plat("linux/arm64").to_string()
        );
    }

    #[test]
    fn maps_magics_to_platforms() {
        let s390 = BinfmtHandler::parse("qemu-s390x", QEMU_S390X_NO_F).unwrap();
        assert_eq!(s390.platform().unwrap().architecture, "s390x");
        assert!(!s390.fix_binary());
        let arm = BinfmtHandler::parse("qemu-arm", QEMU_ARM).unwrap();
        assert!(!arm.enabled);
        let p = arm.platform().unwrap();
        assert_eq!(
            (p.architecture.as_str(), p.variant.as_deref()),
            ("arm", Some("v7"))
        );
        let jar = BinfmtHandler::parse("jar", JAR).unwrap();
        assert_eq!(jar.extension.as_deref(), Some(".jar"));
        assert!(jar.platform().is_none());
    }

    #[test]
    fn rejects_malformed_handlers() {
        let e = BinfmtHandler::parse("x", "enabled\nmagic 7f4\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(BinfmtHandler::parse("x", "interpreter /a\n").is_err());
        assert!(BinfmtHandler::parse("x", "enabled\nbogus 1\n").is_err());
    }

    #[test]
    fn native_platforms_from_uname() {
        assert_eq!(machine_platform("x86_64").unwrap().architecture, "amd64");
        assert_eq!(machine_platform("aarch64").unwrap().architecture, "arm64");
        let s = PlatformSupport::probe("x86_64", Path::new("/nonexistent-binfmt"));
        assert!(s.can_run(&plat("linux/amd64")).is_ok());
        assert!(s.can_run(&plat("linux/386")).is_ok());
    }

    fn binfmt_dir(handlers: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("status"), "enabled\n").unwrap();
        std::fs::write(d.path().join("register"), "").unwrap();
        for (name, text) in handlers {
            std::fs::write(d.path().join(name), text).unwrap();
        }
        d
    }

    #[test]
    fn fixes_for_each_missing_piece() {
        let none = PlatformSupport::probe("x86_64", Path::new("/nonexistent-binfmt"));
        let e = none.can_run(&plat("linux/arm64")).unwrap_err();
        assert!(
            e.contains("mount -t binfmt_misc binfmt_misc /nonexistent-binfmt"),
            "{e}"
        );

        let d = binfmt_dir(&[
            ("qemu-aarch64", QEMU_AARCH64),
            ("qemu-s390x", QEMU_S390X_NO_F),
            ("qemu-arm", QEMU_ARM),
            ("jar", JAR),
        ]);
        let s = PlatformSupport::probe("x86_64", d.path());
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert!(s.can_run(&plat("linux/arm64")).is_ok());
        let e = s.can_run(&plat("linux/riscv64")).unwrap_err();
        assert!(
            e.contains("apt-get install qemu-user-static")
                && e.contains("/usr/lib/binfmt.d/qemu-riscv64.conf"),
            "{e}"
        );
        let e = s.can_run(&plat("linux/s390x")).unwrap_err();
        assert!(e.contains("F (fix-binary)"), "{e}");
        let e = s.can_run(&plat("linux/arm/v7")).unwrap_err();
        assert!(e.contains("is disabled") && e.contains("qemu-arm"), "{e}");
        let emulated: Vec<String> = s.emulated().iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(
            emulated,
            vec!["linux/arm64".to_owned(), "linux/s390x".to_owned()]
        );

        std::fs::write(d.path().join("status"), "disabled\n").unwrap();
        let off = PlatformSupport::probe("x86_64", d.path());
        assert!(off
            .can_run(&plat("linux/arm64"))
            .unwrap_err()
            .contains("/status"));
    }
}
