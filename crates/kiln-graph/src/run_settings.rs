//! The settings of `RUN` containers that docker-buildx takes on the command line:
//! `--add-host` ([`ExtraHost`]), `--shm-size` ([`parse_shm_size`]) and `--ulimit`
//! ([`Ulimit`]). Each parser names the flag and the bad value when it refuses one, with
//! buildx's spellings accepted. They become part of every `RUN` step's op, so a change of
//! any of them reruns the steps, as in BuildKit.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::options::OptionError;

/// One `--add-host NAME:ADDR` (or `NAME=ADDR`) entry, written into the `/etc/hosts` of every
/// `RUN` step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraHost {
    /// The host name.
    pub name: String,
    /// What it resolves to.
    pub addr: HostAddr,
}

/// The address of an [`ExtraHost`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostAddr {
    /// An IPv4 or IPv6 address.
    Ip(IpAddr),
    /// `host-gateway`: the address a step reaches the host on, which depends on the step's
    /// network (resolved when the step runs).
    HostGateway,
}

impl ExtraHost {
    /// Parses one `--add-host` value: `NAME:ADDR` or `NAME=ADDR`, an IPv6 address optionally
    /// in brackets, `host-gateway` for the host.
    pub fn parse(flag: &str, value: &str) -> Result<Self, OptionError> {
        // buildx: `=` separates when present (IPv6 addresses hold colons), else the first `:`.
        let (name, addr) = value
            .split_once('=')
            .or_else(|| value.split_once(':'))
            .ok_or_else(|| {
                OptionError::new(
                    flag,
                    value,
                    "expected NAME:IP (or NAME=IP, or NAME=host-gateway)",
                )
            })?;
        let name = name.trim();
        if name.is_empty()
            || name
                .chars()
                .any(|c| c.is_whitespace() || c == '#' || c.is_control())
        {
            return Err(OptionError::new(
                flag,
                value,
                format!("`{name}` is not a host name"),
            ));
        }
        let addr = addr.trim();
        let addr = if addr == "host-gateway" {
            HostAddr::HostGateway
        } else {
            let bare = addr
                .strip_prefix('[')
                .and_then(|a| a.strip_suffix(']'))
                .unwrap_or(addr);
            HostAddr::Ip(bare.parse().map_err(|_| {
                OptionError::new(
                    flag,
                    value,
                    format!("`{addr}` is not an IP address (nor `host-gateway`)"),
                )
            })?)
        };
        Ok(ExtraHost {
            name: name.to_string(),
            addr,
        })
    }
}

/// One `--ulimit NAME=SOFT[:HARD]` entry, applied to every `RUN` step's processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ulimit {
    /// Docker's name of the limit (`nofile`, `nproc`, `core`, ...).
    pub name: String,
    /// The soft limit; `u64::MAX` is unlimited (`-1`).
    pub soft: u64,
    /// The hard limit, never below `soft`; `u64::MAX` is unlimited (`-1`).
    pub hard: u64,
}

/// The limit names `--ulimit` takes (Docker's, each one `RLIMIT_<NAME>`).
pub const ULIMIT_NAMES: &[&str] = &[
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];

impl Ulimit {
    /// Parses `NAME=SOFT[:HARD]` as Docker does: one number sets both limits, `-1` is
    /// unlimited, and a soft limit above the hard one is refused.
    pub fn parse(flag: &str, value: &str) -> Result<Self, OptionError> {
        let (name, limits) = value.split_once('=').ok_or_else(|| {
            OptionError::new(
                flag,
                value,
                "expected NAME=SOFT[:HARD], e.g. nofile=1024:2048",
            )
        })?;
        let name = name.trim();
        if !ULIMIT_NAMES.contains(&name) {
            return Err(OptionError::new(
                flag,
                value,
                format!("unknown limit `{name}`; known: {}", ULIMIT_NAMES.join(", ")),
            ));
        }
        let number = |s: &str| -> Result<u64, OptionError> {
            match s.trim() {
                "-1" => Ok(u64::MAX),
                n => n.parse().map_err(|_| {
                    OptionError::new(
                        flag,
                        value,
                        format!("`{n}` is not a limit: expected a whole number or -1 (unlimited)"),
                    )
                }),
            }
        };
        let (soft, hard) = match limits.split_once(':') {
            Some((s, h)) => (number(s)?, number(h)?),
            None => {
                let n = number(limits)?;
                (n, n)
            }
        };
        if soft > hard {
            return Err(OptionError::new(
                flag,
                value,
                format!("the soft limit {soft} is above the hard limit {hard}"),
            ));
        }
        Ok(Ulimit {
            name: name.to_string(),
            soft,
            hard,
        })
    }
}

/// Parses a `--shm-size` value as Docker does: bytes, or a number with a unit `b`, `k`, `m`,
/// `g`, `t`, `p` (powers of 1024; case and a trailing `b`/`ib` ignored: `64m`, `64MB`,
/// `1.5g`).
pub fn parse_shm_size(flag: &str, value: &str) -> Result<u64, OptionError> {
    let bad = || {
        OptionError::new(
            flag,
            value,
            "expected a size in bytes or with a unit, e.g. 64m, 2g, 1048576",
        )
    };
    let v = value.trim().to_ascii_lowercase();
    let digits_end = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (number, unit) = v.split_at(digits_end);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let unit = unit.trim_start();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(unit);
    let scale: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        "p" => 1 << 50,
        _ => return Err(bad()),
    };
    let bytes = number * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(OptionError::new(
            flag,
            value,
            "the size must be at least one byte",
        ));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_host_takes_both_separators_brackets_and_host_gateway() {
        let h = ExtraHost::parse("--add-host", "db:10.1.2.3").unwrap();
        assert_eq!(h.name, "db");
        assert_eq!(h.addr, HostAddr::Ip("10.1.2.3".parse().unwrap()));
        let h = ExtraHost::parse("--add-host", "v6=[2001:db8::1]").unwrap();
        assert_eq!(h.addr, HostAddr::Ip("2001:db8::1".parse().unwrap()));
        let h = ExtraHost::parse("--add-host", "v6=2001:db8::1").unwrap();
        assert_eq!(h.addr, HostAddr::Ip("2001:db8::1".parse().unwrap()));
        let h = ExtraHost::parse("--add-host", "host.docker.internal:host-gateway").unwrap();
        assert_eq!(h.addr, HostAddr::HostGateway);
        for bad in ["db", "db:notanip", ":1.2.3.4", "a b:1.2.3.4"] {
            let e = ExtraHost::parse("--add-host", bad).unwrap_err();
            assert_eq!(e.flag, "--add-host", "{bad}");
        }
    }

    #[test]
    fn ulimit_takes_one_or_two_numbers_and_refuses_soft_above_hard() {
        let u = Ulimit::parse("--ulimit", "nofile=1024:2048").unwrap();
        assert_eq!((u.name.as_str(), u.soft, u.hard), ("nofile", 1024, 2048));
        let u = Ulimit::parse("--ulimit", "core=-1").unwrap();
        assert_eq!((u.soft, u.hard), (u64::MAX, u64::MAX));
        let e = Ulimit::parse("--ulimit", "nofile=4096:1024").unwrap_err();
        assert!(e.reason.contains("above the hard limit"), "{e}");
        for bad in ["nofile", "files=1", "nofile=x", "nofile=1:y"] {
            assert!(Ulimit::parse("--ulimit", bad).is_err(), "{bad}");
        }
    }

    fn flags(
        f: impl FnOnce(&mut crate::RawBuildFlags),
    ) -> Result<crate::BuildOptions, OptionError> {
        let mut raw = crate::RawBuildFlags {
            context: Some(".".into()),
            ..Default::default()
        };
        f(&mut raw);
        crate::BuildOptions::from_flags(&raw)
    }

    #[test]
    fn buildx_run_settings_parse_into_the_options() {
        let o = flags(|r| {
            r.labels = vec!["a=1".into(), "b".into()];
            r.add_hosts = vec!["x:1.2.3.4,y=host-gateway".into()];
            r.shm_size = Some("64m".into());
            r.ulimits = vec!["nofile=10:20".into(), "nofile=30".into()];
            r.cgroup_parent = Some("/ci/builds/".into());
        })
        .unwrap();
        assert_eq!(o.labels.get("a").map(String::as_str), Some("1"));
        assert_eq!(o.labels.get("b").map(String::as_str), Some(""));
        assert_eq!(o.extra_hosts.len(), 2);
        assert_eq!(o.extra_hosts[1].addr, HostAddr::HostGateway);
        assert_eq!(o.shm_size, Some(64 << 20));
        // The last --ulimit of a name wins.
        assert_eq!(o.ulimits.len(), 1);
        assert_eq!((o.ulimits[0].soft, o.ulimits[0].hard), (30, 30));
        assert_eq!(o.cgroup_parent.as_deref(), Some("ci/builds"));
        let e = flags(|r| r.cgroup_parent = Some("a/../b".into())).unwrap_err();
        assert_eq!(e.flag, "--cgroup-parent");
    }

    #[test]
    fn buildctl_spells_them_as_frontend_options() {
        let o = flags(|r| {
            r.opts = vec![
                "add-hosts=a=1.1.1.1,b=host-gateway".into(),
                "shm-size=1048576".into(),
                "ulimit=nofile=1:2,nproc=3".into(),
                "cgroup-parent=ci".into(),
            ]
        })
        .unwrap();
        assert_eq!(o.extra_hosts.len(), 2);
        assert_eq!(o.shm_size, Some(1 << 20));
        assert_eq!(o.ulimits.len(), 2);
        assert_eq!(o.cgroup_parent.as_deref(), Some("ci"));
        let e = flags(|r| r.opts = vec!["ulimit=nofile=x".into()]).unwrap_err();
        assert_eq!(e.flag, "--opt");
    }

    #[test]
    fn a_remote_context_is_refused_naming_it() {
        for url in [
            "https://example.com/context.tar.gz",
            "https://github.com/a/b.git#main:dir",
            "git@github.com:a/b.git",
            "git://h/r",
        ] {
            let e = flags(|r| r.context = Some(url.into())).unwrap_err();
            assert_eq!((e.flag.as_str(), e.value.as_str()), ("CONTEXT", url));
        }
    }

    #[test]
    fn run_ops_without_the_settings_keep_their_bytes() {
        let op = crate::graph::ExecOp {
            rootfs: None,
            args: vec!["true".into()],
            env: Vec::new(),
            cwd: "/".into(),
            user: String::new(),
            network: crate::graph::NetworkMode::Default,
            security: crate::graph::SecurityMode::Sandbox,
            mounts: Vec::new(),
            extra_hosts: Vec::new(),
            shm_size: None,
            ulimits: Vec::new(),
        };
        let bytes = serde_json::to_string(&op).unwrap();
        for key in ["extra_hosts", "shm_size", "ulimits"] {
            assert!(!bytes.contains(key), "{bytes}");
        }
        let with = crate::graph::ExecOp {
            shm_size: Some(1),
            ..op
        };
        assert!(serde_json::to_string(&with).unwrap().contains("shm_size"));
    }

    #[test]
    fn shm_size_reads_docker_units() {
        let p = |v| parse_shm_size("--shm-size", v);
        assert_eq!(p("1048576").unwrap(), 1 << 20);
        assert_eq!(p("64m").unwrap(), 64 << 20);
        assert_eq!(p("64MB").unwrap(), 64 << 20);
        assert_eq!(p("1g").unwrap(), 1 << 30);
        assert_eq!(p("2k").unwrap(), 2048);
        assert_eq!(p("1.5k").unwrap(), 1536);
        for bad in ["", "m", "64x", "0", "-1m"] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }
}
