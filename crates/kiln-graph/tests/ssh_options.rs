//! `--ssh`, the `--secret` forms, and the `security.insecure` entitlement that
//! `RUN --security=insecure` needs.

use kiln_graph::graph::{MountKind, SecurityMode};
use kiln_graph::options::{SecretSource, SecretSpec, SshSpec};
use kiln_graph::{BuildGraph, BuildOptions, FrontendError, Op, RawBuildFlags};

fn flags(extra: impl FnOnce(&mut RawBuildFlags)) -> Result<BuildOptions, kiln_graph::OptionError> {
    let mut raw = RawBuildFlags {
        context: Some("ctx".into()),
        ..Default::default()
    };
    extra(&mut raw);
    BuildOptions::from_flags(&raw)
}

fn lower(src: &str, o: &BuildOptions) -> Result<BuildGraph, FrontendError> {
    let df = kiln_dockerfile::parse(src).expect("test Dockerfile parses");
    kiln_graph::lower(&df, o, &[], &kiln_graph::OfflineResolver)
}

fn exec_mounts(g: &BuildGraph) -> Vec<(String, MountKind)> {
    g.vertices
        .iter()
        .filter_map(|v| match &v.op {
            Op::Exec(e) => Some(e.mounts.iter().map(|m| (m.target.clone(), m.kind.clone()))),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn ssh_values_parse_as_buildx_reads_them() {
    let p = |v: &str| SshSpec::parse("--ssh", v).unwrap();
    assert_eq!(
        p("default"),
        SshSpec {
            id: "default".into(),
            paths: vec![]
        }
    );
    assert_eq!(
        p("deploy=/run/agent.sock").paths,
        [std::path::PathBuf::from("/run/agent.sock")]
    );
    assert_eq!(
        p("gh=/k/a,/k/b"),
        SshSpec {
            id: "gh".into(),
            paths: vec!["/k/a".into(), "/k/b".into()]
        }
    );
    for (bad, needle) in [
        ("", "missing id"),
        ("=/k", "missing id"),
        (
            "/home/me/.ssh/id_ed25519",
            "--ssh default=/home/me/.ssh/id_ed25519",
        ),
        ("a=/k,,/j", "an empty path"),
    ] {
        let e = SshSpec::parse("--ssh", bad).unwrap_err();
        assert_eq!(e.flag, "--ssh");
        assert!(e.to_string().contains(needle), "{bad}: {e}");
    }
    let o = flags(|r| r.ssh = vec!["default".into(), "gh=/k".into()]).unwrap();
    assert_eq!(o.ssh.len(), 2);
    let e = flags(|r| r.ssh = vec!["gh".into(), "gh=/k".into()]).unwrap_err();
    assert!(e.to_string().contains("given twice"), "{e}");
}

#[test]
fn every_buildx_secret_form_parses() {
    let p = |v: &str| SecretSpec::parse("--secret", v).unwrap();
    let file = |f: &str| SecretSource::File(f.into());
    let env = |e: &str| SecretSource::Env(e.into());
    assert_eq!(p("id=a,src=/f").source, file("/f"));
    assert_eq!(p("id=a,source=/f").source, file("/f"));
    assert_eq!(p("ID=a,SRC=/f").source, file("/f"));
    assert_eq!(p("id=a,env=VAR").source, env("VAR"));
    assert_eq!(p("type=file,id=a,src=/f").source, file("/f"));
    assert_eq!(p("type=file,id=a").source, file("a"));
    assert_eq!(p("type=env,id=a,env=VAR").source, env("VAR"));
    assert_eq!(p("type=env,id=a,src=VAR").source, env("VAR"));
    assert_eq!(p("type=env,id=a").source, env("a"));
    assert_eq!(
        p(r#""id=a","src=/dir,with,commas""#).source,
        file("/dir,with,commas")
    );
    // Only a bare id falls back to the file of that name when the variable is unset.
    let bare = p("id=TOKEN");
    assert_eq!(
        (bare.source, bare.or_file),
        (env("TOKEN"), Some("TOKEN".into()))
    );
    assert_eq!(p("id=a,env=VAR").or_file, None);
    assert_eq!(p("type=env,id=a").or_file, None);
    for (bad, needle) in [
        ("type=file,id=a,env=V", "type=file reads a file"),
        ("id=a,src=", "src= is empty"),
        ("id=a,env=", "env= is empty"),
        ("id=a,src", "not key=value"),
    ] {
        let e = SecretSpec::parse("--secret", bad).unwrap_err();
        assert_eq!(e.flag, "--secret");
        assert!(e.to_string().contains(needle), "{bad}: {e}");
    }
    // As buildx, a later --secret with the same id wins.
    let o = flags(|r| r.secrets = vec!["id=a,src=/1".into(), "id=a,src=/2".into()]).unwrap();
    assert_eq!(o.secrets.len(), 1);
    assert_eq!(o.secrets[0].source, file("/2"));
}

#[test]
fn run_security_insecure_needs_allow_security_insecure_naming_its_line() {
    let src = "FROM scratch\nRUN true\nRUN --security=insecure true\n";
    let e = lower(src, &flags(|_| {}).unwrap()).unwrap_err();
    let shown = e.render("Dockerfile", src);
    assert!(shown.contains("Dockerfile:3"), "{shown}");
    assert!(shown.contains("--allow security.insecure"), "{shown}");
    assert!(
        shown.contains("entitlement security.insecure is not allowed"),
        "{shown}"
    );
    // network.host is a different entitlement.
    let o = flags(|r| r.allow = vec!["network.host".into()]).unwrap();
    assert!(lower(src, &o).is_err());
    let o = flags(|r| r.allow = vec!["security.insecure".into()]).unwrap();
    let g = lower(src, &o).unwrap();
    let modes: Vec<SecurityMode> = g
        .vertices
        .iter()
        .filter_map(|v| match &v.op {
            Op::Exec(e) => Some(e.security),
            _ => None,
        })
        .collect();
    assert_eq!(modes, [SecurityMode::Sandbox, SecurityMode::Insecure]);
    // A subrequest runs no step, so it needs no entitlement (network.host neither).
    let outline = flags(|r| r.call = Some("outline".into())).unwrap();
    lower(src, &outline).unwrap();
    lower("FROM scratch\nRUN --network=host true\n", &outline).unwrap();
    // --security=sandbox needs nothing.
    lower(
        "FROM scratch\nRUN --security=sandbox true\n",
        &flags(|_| {}).unwrap(),
    )
    .unwrap();
}

#[test]
fn a_required_ssh_agent_that_was_not_given_fails_naming_its_line() {
    let src = "FROM scratch\nRUN true\nRUN --mount=type=ssh,id=gh,required=true true\n";
    let e = lower(src, &flags(|_| {}).unwrap()).unwrap_err();
    let shown = e.render("Dockerfile", src);
    assert!(shown.contains("Dockerfile:3"), "{shown}");
    assert!(shown.contains("--ssh gh"), "{shown}");
    lower(src, &flags(|r| r.ssh = vec!["gh=/k".into()]).unwrap()).unwrap();
    // Optional agents lower without --ssh (the step runs without them).
    lower(
        "FROM scratch\nRUN --mount=type=ssh true\n",
        &flags(|_| {}).unwrap(),
    )
    .unwrap();
    // A subrequest runs nothing, so it does not need the agent.
    lower(src, &flags(|r| r.call = Some("outline".into())).unwrap()).unwrap();
}

#[test]
fn ssh_mounts_without_target_are_numbered_and_keys_hold_no_socket_path() {
    let src = "FROM scratch\nRUN --mount=type=ssh --mount=type=ssh,id=gh,uid=33,mode=0660 true\n";
    let o =
        flags(|r| r.ssh = vec!["default=/tmp/agent.sock".into(), "gh=/secret/key".into()]).unwrap();
    let g = lower(src, &o).unwrap();
    let mounts = exec_mounts(&g);
    assert_eq!(
        mounts,
        [
            (
                "/run/buildkit/ssh_agent.0".to_string(),
                MountKind::Ssh {
                    id: "default".into(),
                    required: false,
                    uid: 0,
                    gid: 0,
                    mode: 0o600
                }
            ),
            (
                "/run/buildkit/ssh_agent.1".to_string(),
                MountKind::Ssh {
                    id: "gh".into(),
                    required: false,
                    uid: 33,
                    gid: 0,
                    mode: 0o660
                }
            ),
        ]
    );
    for v in &g.vertices {
        let op = String::from_utf8(v.canonical_op()).unwrap();
        assert!(
            !op.contains("agent.sock") && !op.contains("/secret/key"),
            "{op}"
        );
    }
    // The same Dockerfile with another agent path has the same ops (the same cache keys).
    let o2 = flags(|r| r.ssh = vec!["default=/elsewhere".into(), "gh=/other".into()]).unwrap();
    let g2 = lower(src, &o2).unwrap();
    let ops =
        |g: &BuildGraph| -> Vec<Vec<u8>> { g.vertices.iter().map(|v| v.canonical_op()).collect() };
    assert_eq!(ops(&g), ops(&g2));
}
