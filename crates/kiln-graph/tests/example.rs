//! The example project in `examples/` lowers to the stages each target needs.

use std::collections::BTreeSet;

use kiln_graph::{lower, plan, targets, BuildOptions, OfflineResolver, Op};

fn example() -> kiln_dockerfile::Dockerfile {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/Dockerfile"
    ))
    .unwrap();
    kiln_dockerfile::parse(&text).unwrap()
}

fn stages_for(target: &str) -> BTreeSet<String> {
    let mut o = BuildOptions::for_context("examples");
    o.target = Some(target.into());
    let g = lower(&example(), &o, &[], &OfflineResolver).unwrap();
    g.stages.iter().map(|s| s.name.clone().unwrap()).collect()
}

#[test]
fn example_targets_list_all_stages_with_test_as_default() {
    let t = targets(&example()).unwrap();
    let names: Vec<_> = t.iter().map(|x| x.name.clone().unwrap()).collect();
    assert_eq!(
        names,
        [
            "composer-deps",
            "npm-deps",
            "php-ext",
            "app",
            "release",
            "dev",
            "test"
        ]
    );
    assert!(t.last().unwrap().default);
    assert!(
        t[0].description.starts_with("installs the PHP packages"),
        "{}",
        t[0].description
    );
}

#[test]
fn release_needs_app_and_the_three_dependency_stages_only() {
    let want: BTreeSet<String> = ["composer-deps", "npm-deps", "php-ext", "app", "release"]
        .map(String::from)
        .into();
    assert_eq!(stages_for("release"), want);
    let want: BTreeSet<String> = ["composer-deps", "npm-deps", "php-ext", "app", "dev", "test"]
        .map(String::from)
        .into();
    assert_eq!(stages_for("test"), want);
}

#[test]
fn dependency_stages_do_not_depend_on_each_other() {
    let mut o = BuildOptions::for_context("examples");
    o.target = Some("test".into());
    let g = lower(&example(), &o, &[], &OfflineResolver).unwrap();
    let p = plan(&g);
    for dep in ["composer-deps", "npm-deps", "php-ext"] {
        let s = p.stages.iter().find(|s| s.name == dep).unwrap();
        assert!(
            s.depends_on.is_empty(),
            "{dep} depends on {:?}",
            s.depends_on
        );
    }
    let app = p.stages.iter().find(|s| s.name == "app").unwrap();
    assert_eq!(app.depends_on, ["composer-deps", "npm-deps", "php-ext"]);
    // Every input precedes its user.
    for (i, v) in g.vertices.iter().enumerate() {
        assert!(v.inputs.iter().all(|x| x.index() < i));
    }
    let runs = g
        .vertices
        .iter()
        .filter(|v| matches!(v.op, Op::Exec(_)))
        .count();
    assert_eq!(runs, 7);
    println!("{}", p.to_text());
    let t = g.target_stage();
    assert_eq!(
        t.config.runtime().cmd.as_deref(),
        Some(&["sh".to_string(), "tests/run.sh".to_string()][..])
    );
    assert_eq!(t.config.env_get("APP_ENV"), Some("development"));
    assert_eq!(t.config.env_get("APP_VERSION"), Some("1.0.0"));
}

#[test]
fn example_outline_lists_args_in_declaration_order() {
    let mut o = BuildOptions::for_context("examples");
    o.target = Some("release".into());
    let (_, outline) =
        kiln_graph::lower_with_outline(&example(), &o, &[], &OfflineResolver).unwrap();
    let names: Vec<&str> = outline.args.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(
        names,
        ["BASE_IMAGE", "APP_VERSION", "NODE_ENV", "PHP_VERSION"]
    );
    assert_eq!(
        outline.args[1].description,
        "is the version string baked into the application."
    );
    assert_eq!(outline.secrets.len(), 1);
}
