//! `--network`, `--allow` and `--pids-limit`, and the `network.host` entitlement that
//! `RUN --network=host` needs.

use kiln_graph::graph::NetworkMode;
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

fn run_networks(g: &BuildGraph) -> Vec<NetworkMode> {
    g.vertices
        .iter()
        .filter_map(|v| match &v.op {
            Op::Exec(e) => Some(e.network),
            _ => None,
        })
        .collect()
}

#[test]
fn by_default_runs_use_their_own_network_with_no_entitlement_and_no_pids_limit() {
    let o = flags(|_| {}).unwrap();
    assert_eq!(o.network, NetworkMode::Default);
    assert!(!o.entitlements.network_host);
    assert_eq!(o.pids_limit, None);
}

#[test]
fn network_host_on_the_command_line_needs_allow_network_host() {
    let e = flags(|r| r.network = Some("host".into())).unwrap_err();
    assert_eq!(e.flag, "--network");
    assert!(e.to_string().contains("--allow network.host"), "{e}");
    let o = flags(|r| {
        r.network = Some("host".into());
        r.allow = vec!["network.host".into()];
    })
    .unwrap();
    assert_eq!(o.network, NetworkMode::Host);
    let e = flags(|r| r.opts = vec!["force-network-mode=host".into()]).unwrap_err();
    assert_eq!(e.flag, "--opt force-network-mode");
    let o = flags(|r| r.opts = vec!["force-network-mode=none".into()]).unwrap();
    assert_eq!(o.network, NetworkMode::None);
}

#[test]
fn bad_network_entitlement_and_pids_values_name_their_flag() {
    let e = flags(|r| r.network = Some("bridge".into())).unwrap_err();
    assert_eq!(e.flag, "--network");
    let e = flags(|r| r.allow = vec!["network.host,network.hots".into()]).unwrap_err();
    assert_eq!(
        (e.flag.as_str(), e.value.as_str()),
        ("--allow", "network.hots")
    );
    for bad in ["0", "-1", "many"] {
        let e = flags(|r| r.pids_limit = Some(bad.into())).unwrap_err();
        assert_eq!(e.flag, "--pids-limit", "{bad}");
    }
    let o = flags(|r| r.pids_limit = Some("512".into())).unwrap();
    assert_eq!(o.pids_limit, Some(512));
}

#[test]
fn run_network_host_without_the_entitlement_fails_naming_its_line() {
    let src = "FROM scratch\nRUN true\nRUN --network=host true\n";
    let o = flags(|_| {}).unwrap();
    let e = lower(src, &o).unwrap_err();
    let shown = e.render("Dockerfile", src);
    assert!(shown.contains("Dockerfile:3"), "{shown}");
    assert!(shown.contains("--allow network.host"), "{shown}");
    let o = flags(|r| r.allow = vec!["network.host".into()]).unwrap();
    let g = lower(src, &o).unwrap();
    assert_eq!(run_networks(&g), [NetworkMode::Default, NetworkMode::Host]);
}

#[test]
fn the_command_line_network_applies_to_runs_that_name_none() {
    let src = "FROM scratch\nRUN true\nRUN --network=default true\n";
    let o = flags(|r| r.network = Some("none".into())).unwrap();
    let g = lower(src, &o).unwrap();
    assert_eq!(run_networks(&g), [NetworkMode::None, NetworkMode::Default]);
}
