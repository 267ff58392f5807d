//! The Linux personality (execution domain) a step runs with.
//!
//! A 32-bit target on a 64-bit machine (`--platform linux/386` on an x86_64 runner,
//! `linux/arm/v7` on an aarch64 one) runs its steps with `PER_LINUX32`, as Docker and
//! BuildKit do through the OCI runtime spec's `linux.personality` `{"domain": "LINUX32"}`:
//! `uname -m` then prints the 32-bit machine name (`i686`, `armv8l`), so configure scripts and
//! package managers inside the step pick the 32-bit target instead of the kernel's.

use kiln_oci::Platform;

/// `PER_LINUX32` from `<linux/personality.h>`: Linux with 32-bit `uname` machine names.
pub(crate) const PER_LINUX32: libc::c_ulong = 0x0008;

/// The personality a step's process gets before it is executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Personality {
    /// Whatever kiln's own process has (the host's native domain).
    #[default]
    Default,
    /// `PER_LINUX32`: the kernel reports a 32-bit machine (`i686` on x86_64, `armv8l` on
    /// aarch64).
    Linux32,
}

impl Personality {
    /// The personality for a step building for `target` on a machine whose architecture is
    /// `host_arch` (Go's spelling, as [`Platform::architecture`]: `amd64`, `arm64`):
    /// [`Personality::Linux32`] when the target is Linux on a 32-bit architecture and the
    /// host a 64-bit one, else [`Personality::Default`].
    pub fn for_platform(target: &Platform, host_arch: &str) -> Personality {
        if target.os == "linux" && is_32_bit(&target.architecture) && is_64_bit(host_arch) {
            Personality::Linux32
        } else {
            Personality::Default
        }
    }

    /// [`Personality::for_platform`] on this machine ([`Platform::host`]'s architecture).
    pub fn for_platform_here(target: &Platform) -> Personality {
        Personality::for_platform(target, &Platform::host().architecture)
    }

    /// The value passed to `personality(2)`, or `None` to leave the inherited one.
    pub(crate) fn persona(self) -> Option<libc::c_ulong> {
        match self {
            Personality::Default => None,
            Personality::Linux32 => Some(PER_LINUX32),
        }
    }

    /// The OCI runtime spec's `linux.personality.domain`, or `None` to leave it out.
    pub fn oci_domain(self) -> Option<&'static str> {
        match self {
            Personality::Default => None,
            Personality::Linux32 => Some("LINUX32"),
        }
    }
}

/// Architectures (Go's names) whose user space is 32-bit. `s390` is 31-bit, which the kernel
/// also runs as `PER_LINUX32` on s390x.
fn is_32_bit(arch: &str) -> bool {
    matches!(
        arch,
        "386" | "arm" | "armbe" | "mips" | "mipsle" | "ppc" | "s390" | "riscv32" | "sparc"
    )
}

/// Architectures (Go's names) of 64-bit kernels that can run a 32-bit personality.
fn is_64_bit(arch: &str) -> bool {
    matches!(
        arch,
        "amd64"
            | "arm64"
            | "arm64be"
            | "ppc64"
            | "ppc64le"
            | "s390x"
            | "mips64"
            | "mips64le"
            | "riscv64"
            | "loong64"
            | "sparc64"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    #[test]
    fn a_32_bit_target_on_a_64_bit_host_is_linux32() {
        for target in ["linux/386", "linux/arm/v7", "linux/arm/v6", "linux/arm/v5"] {
            assert_eq!(
                Personality::for_platform(&p(target), "amd64"),
                Personality::Linux32,
                "{target} on amd64"
            );
        }
        assert_eq!(
            Personality::for_platform(&p("linux/arm/v7"), "arm64"),
            Personality::Linux32
        );
        assert_eq!(
            Personality::for_platform(&p("linux/ppc"), "ppc64le"),
            Personality::Linux32
        );
        assert_eq!(
            Personality::for_platform(&p("linux/s390"), "s390x"),
            Personality::Linux32
        );
    }

    #[test]
    fn a_64_bit_target_keeps_the_default() {
        for target in ["linux/amd64", "linux/arm64", "linux/ppc64le", "linux/s390x"] {
            assert_eq!(
                Personality::for_platform(&p(target), "amd64"),
                Personality::Default,
                "{target}"
            );
        }
    }

    #[test]
    fn a_32_bit_host_keeps_the_default() {
        assert_eq!(
            Personality::for_platform(&p("linux/386"), "386"),
            Personality::Default
        );
        assert_eq!(
            Personality::for_platform(&p("linux/arm/v7"), "arm"),
            Personality::Default
        );
    }

    #[test]
    fn linux32_is_per_linux32_and_the_oci_domain() {
        assert_eq!(Personality::Linux32.persona(), Some(0x0008));
        assert_eq!(Personality::Linux32.oci_domain(), Some("LINUX32"));
        assert_eq!(Personality::Default.persona(), None);
        assert_eq!(Personality::Default.oci_domain(), None);
    }

    #[test]
    fn the_default_seccomp_profile_allows_linux32() {
        assert_eq!(PER_LINUX32, 0x0008);
        assert!(crate::security::personalities().contains(&0x0008));
    }
}
