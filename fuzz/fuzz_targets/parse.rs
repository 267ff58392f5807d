//! Fuzzes the whole front of kiln-dockerfile: parse, lower, expand, .dockerignore.
#![no_main]

use kiln_dockerfile::dockerignore::IgnoreMatcher;
use kiln_dockerfile::instructions::lower;
use kiln_dockerfile::shell::Lexer;
use kiln_dockerfile::{parse, Args};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(df) = parse(src) {
        let lex = Lexer::new(df.escape);
        let lookup = |n: &str| (n.len() % 2 == 0).then(|| format!("v{n}"));
        for inst in &df.instructions {
            let _ = lower(inst);
            if let Args::Text(w) = &inst.args {
                let _ = lex.expand(&w.text, &lookup);
            }
        }
    } else if let Err(e) = parse(src) {
        let _ = e.render("Dockerfile", src);
    }
    let _ = Lexer::new('\\').expand(src, &|_| Some("x y".into()));
    if let Ok(m) = IgnoreMatcher::parse(src) {
        let _ = m.matches("a/b/c.txt");
        let _ = m.may_match_under("a");
    }
});
