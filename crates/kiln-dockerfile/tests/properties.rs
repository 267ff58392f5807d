//! Property tests: printing a generated instruction list and parsing it back gives the same
//! instructions; and no input makes the parser, lowering, lexer or .dockerignore panic.

mod common;

use kiln_dockerfile::dockerignore::IgnoreMatcher;
use kiln_dockerfile::instructions::lower;
use kiln_dockerfile::shell::Lexer;
use kiln_dockerfile::{parse, Args};
use proptest::prelude::*;

/// The model the generator produces and the parser must reproduce.
#[derive(Debug, Clone, PartialEq)]
struct Model {
    keyword: String,
    flags: Vec<(String, Option<String>)>,
    args: Vec<String>,
    json: bool,
    heredocs: Vec<(String, String)>,
}

fn word() -> impl Strategy<Value = String> {
    "[a-z0-9/._:-]{1,10}".prop_filter("not a flag", |w| !w.starts_with("--"))
}

fn keyword(k: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        Just(k.to_string()),
        Just(k.to_lowercase()),
        Just(format!("{}{}", &k[..1], k[1..].to_lowercase()))
    ]
}

fn flags() -> impl Strategy<Value = Vec<(String, Option<String>)>> {
    prop::collection::vec(
        ("[a-z][a-z-]{0,8}", prop::option::of("[a-z0-9=,/._]{0,12}")),
        0..3,
    )
}

fn instruction() -> impl Strategy<Value = Model> {
    prop_oneof![
        // Shell form.
        (keyword("RUN"), flags(), prop::collection::vec(word(), 1..5)).prop_map(|(k, f, w)| {
            Model {
                keyword: k,
                flags: f,
                args: vec![w.join(" ")],
                json: false,
                heredocs: vec![],
            }
        }),
        // Exec form.
        (
            keyword("CMD"),
            prop::collection::vec("[a-z0-9 /._$-]{0,8}", 0..4)
        )
            .prop_map(|(k, w)| Model {
                keyword: k,
                flags: vec![],
                args: w,
                json: true,
                heredocs: vec![],
            }),
        // Whitespace-split words.
        (
            keyword("EXPOSE"),
            prop::collection::vec("[0-9]{1,5}(/tcp|/udp)?", 1..4)
        )
            .prop_map(|(k, w)| Model {
                keyword: k,
                flags: vec![],
                args: w,
                json: false,
                heredocs: vec![],
            }),
        // ENV key=value pairs.
        (
            keyword("ENV"),
            prop::collection::vec(("[A-Z_][A-Z0-9_]{0,6}", "[a-z0-9/._:-]{0,8}"), 1..4)
        )
            .prop_map(|(k, kv)| Model {
                keyword: k,
                flags: vec![],
                args: kv.into_iter().flat_map(|(a, b)| [a, b]).collect(),
                json: false,
                heredocs: vec![],
            }),
        // Heredocs.
        (
            keyword("COPY"),
            prop::collection::vec(
                (
                    "[A-Z]{2,5}",
                    prop::collection::vec("[a-z0-9 =$]{0,12}", 0..4)
                ),
                1..3
            ),
            word()
        )
            .prop_map(|(k, docs, dest)| {
                let mut seen = std::collections::BTreeSet::new();
                let docs: Vec<(String, String)> = docs
                    .into_iter()
                    .filter(|(n, _)| seen.insert(n.clone()))
                    .map(|(n, lines)| {
                        let body: String = lines
                            .iter()
                            .filter(|l| l.trim() != n)
                            .map(|l| format!("{l}\n"))
                            .collect();
                        (n, body)
                    })
                    .collect();
                let mut args: Vec<String> = docs.iter().map(|(n, _)| format!("<<{n}")).collect();
                args.push(dest);
                Model {
                    keyword: k,
                    flags: vec![],
                    args,
                    json: false,
                    heredocs: docs,
                }
            }),
    ]
}

fn print(models: &[Model], continuation: &[bool]) -> String {
    let mut s = String::new();
    for (i, m) in models.iter().enumerate() {
        let mut parts = vec![m.keyword.clone()];
        for (n, v) in &m.flags {
            parts.push(match v {
                Some(v) => format!("--{n}={v}"),
                None => format!("--{n}"),
            });
        }
        if m.json {
            parts.push(serde_json::to_string(&m.args).expect("json"));
        } else if m.keyword.eq_ignore_ascii_case("ENV") {
            parts.extend(
                m.args
                    .chunks(2)
                    .map(|c| format!("{}={}", c[0], c.get(1).map(String::as_str).unwrap_or(""))),
            );
        } else {
            parts.extend(m.args.iter().cloned());
        }
        let split = continuation.get(i).copied().unwrap_or(false);
        s.push_str(&parts.join(if split { " \\\n  " } else { " " }));
        s.push('\n');
        for (name, body) in &m.heredocs {
            s.push_str(body);
            s.push_str(name);
            s.push('\n');
        }
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn printed_instructions_parse_back_to_the_same_model(
        models in prop::collection::vec(instruction(), 1..8),
        continuation in prop::collection::vec(any::<bool>(), 8),
    ) {
        let src = print(&models, &continuation);
        let df = parse(&src).map_err(|e| TestCaseError::fail(format!("{e} in {src:?}")))?;
        prop_assert_eq!(df.instructions.len(), models.len());
        for (inst, m) in df.instructions.iter().zip(&models) {
            prop_assert_eq!(&inst.keyword, &m.keyword);
            let flags: Vec<(String, Option<String>)> =
                inst.flags.iter().map(|f| (f.name.clone(), f.value.clone())).collect();
            prop_assert_eq!(&flags, &m.flags);
            prop_assert_eq!(inst.is_json(), m.json);
            prop_assert_eq!(&common::value_list(inst), &m.args);
            let docs: Vec<(String, String)> =
                inst.heredocs.iter().map(|h| (h.name.clone(), h.content.clone())).collect();
            prop_assert_eq!(&docs, &m.heredocs);
        }
    }

    #[test]
    fn arbitrary_input_never_panics(src in any::<String>()) {
        exercise(&src);
    }

    #[test]
    fn dockerfile_like_input_never_panics(src in "([A-Za-z]{0,6}|[ \t\n\\\\`'\"$#{}:?%/=<>\\[\\],-]|--[a-z]+=?|<<-?[A-Z]+|\\$\\{[A-Z]+[:#%/?+-]{0,2}){0,60}") {
        exercise(&src);
    }
}

fn exercise(src: &str) {
    match parse(src) {
        Ok(df) => {
            let lex = Lexer::new(df.escape);
            for inst in &df.instructions {
                let _ = lower(inst);
                if let Args::Text(w) = &inst.args {
                    let _ = lex.expand(&w.text, &|n| (n.len() % 2 == 0).then(|| "x y".to_string()));
                }
            }
        }
        Err(e) => {
            let _ = e.render("Dockerfile", src);
        }
    }
    let _ = Lexer::new('\\').expand(src, &|_| Some("v".into()));
    if let Ok(m) = IgnoreMatcher::parse(src) {
        let _ = m.matches("a/b/c");
        let _ = m.may_match_under("a/b");
    }
}
