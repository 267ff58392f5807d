//! `USER name|uid[:group|gid]` resolved from the rootfs's `/etc/passwd` and `/etc/group`,
//! following runc's rules (the ones Docker and BuildKit use).

use std::path::Path;

use crate::rootfs::resolve_in_root;
use crate::spec::ExecError;

/// The credentials a step runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, the primary gid first.
    pub groups: Vec<u32>,
    pub home: String,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(PasswdEntry {
                name: f.first()?.to_string(),
                uid: f.get(2)?.trim().parse().ok()?,
                gid: f.get(3)?.trim().parse().ok()?,
                home: f.get(5).map_or_else(String::new, |s| s.to_string()),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(GroupEntry {
                name: f.first()?.to_string(),
                gid: f.get(2)?.trim().parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

fn read_in_root(rootfs: &Path, path: &str) -> String {
    // A missing or unreadable file behaves as an empty one, as in runc.
    resolve_in_root(rootfs, path)
        .ok()
        .and_then(|p| std::fs::read(p).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Resolves `user` (`None` = root) against the rootfs's passwd and group files.
pub(crate) fn resolve_user(rootfs: &Path, user: Option<&str>) -> Result<ResolvedUser, ExecError> {
    let spec = user.map(str::trim).filter(|u| !u.is_empty()).unwrap_or("0");
    let passwd = parse_passwd(&read_in_root(rootfs, "/etc/passwd"));
    let groups = parse_group(&read_in_root(rootfs, "/etc/group"));
    let err = |reason: String| ExecError::User {
        user: spec.to_string(),
        rootfs: rootfs.to_path_buf(),
        reason,
    };
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() {
        return Err(err("empty user name".into()));
    }
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd.iter().find(|e| e.uid == uid),
        Err(_) => Some(
            passwd
                .iter()
                .find(|e| e.name == user_part)
                .ok_or_else(|| err(format!("no user {user_part:?} in /etc/passwd")))?,
        ),
    };
    let uid = match user_part.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => entry.map_or(0, |e| e.uid),
    };
    let home = entry
        .map(|e| e.home.clone())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| if uid == 0 { "/root".into() } else { "/".into() });
    let name = entry.map(|e| e.name.as_str());
    match group_part {
        Some(g) if !g.is_empty() => {
            let gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => {
                    groups
                        .iter()
                        .find(|e| e.name == g)
                        .ok_or_else(|| err(format!("no group {g:?} in /etc/group")))?
                        .gid
                }
            };
            Ok(ResolvedUser {
                uid,
                gid,
                groups: vec![gid],
                home,
            })
        }
        Some(_) => Err(err("empty group after ':'".into())),
        None => {
            let gid = entry.map_or(0, |e| e.gid);
            let mut all = vec![gid];
            if let Some(name) = name {
                for g in groups
                    .iter()
                    .filter(|g| g.members.iter().any(|m| m == name))
                {
                    if !all.contains(&g.gid) {
                        all.push(g.gid);
                    }
                }
            }
            Ok(ResolvedUser {
                uid,
                gid,
                groups: all,
                home,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("etc/group"),
            "root:x:0:\nalice:x:1000:\nwheel:x:10:alice,bob\naudio:x:29:bob\n",
        )
        .unwrap();
        d
    }

    #[test]
    fn user_name_gets_primary_and_supplementary_groups() {
        let r = rootfs();
        let u = resolve_user(r.path(), Some("alice")).unwrap();
        assert_eq!(
            (u.uid, u.gid, u.groups.clone()),
            (1000, 1000, vec![1000, 10])
        );
        assert_eq!(u.home, "/home/alice");
    }

    #[test]
    fn explicit_group_replaces_supplementary_groups() {
        let r = rootfs();
        let u = resolve_user(r.path(), Some("alice:audio")).unwrap();
        assert_eq!((u.uid, u.gid, u.groups), (1000, 29, vec![29]));
        let u = resolve_user(r.path(), Some("1000:5")).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 5));
    }

    #[test]
    fn unknown_numeric_uid_runs_with_gid_zero() {
        let r = rootfs();
        let u = resolve_user(r.path(), Some("4242")).unwrap();
        assert_eq!((u.uid, u.gid, u.groups), (4242, 0, vec![0]));
    }

    #[test]
    fn unknown_names_are_errors_naming_the_file() {
        let r = rootfs();
        let e = resolve_user(r.path(), Some("mallory"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mallory") && e.contains("/etc/passwd"), "{e}");
        let e = resolve_user(r.path(), Some("alice:nogroup"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/group"), "{e}");
    }
}
