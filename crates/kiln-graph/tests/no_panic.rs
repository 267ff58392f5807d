//! Lowering never panics: thousands of Dockerfiles stitched from valid and hostile fragments
//! (a fixed-seed generator, so failures reproduce) either lower or return an error.

use kiln_graph::{
    lower, lower_with_outline, plan, targets, BuildOptions, OfflineResolver, Platform,
};

const FRAGMENTS: &[&str] = &[
    "FROM busybox AS a",
    "FROM a AS b",
    "FROM scratch",
    "FROM ${BASE:-busybox} AS c",
    "FROM --platform=$BUILDPLATFORM busybox",
    "FROM --platform=bogus busybox",
    "FROM b",
    "FROM 0",
    "FROM Busybox",
    "FROM busybox AS a",
    "FROM $UNSET",
    "ARG BASE=busybox",
    "ARG A B=2 C=$B",
    "ARG TARGETARCH",
    "ARG",
    "ENV A=1 B=$A",
    "ENV X ${A:?no}",
    "ENV =x",
    "LABEL a=b \"c d\"=e",
    "WORKDIR rel",
    "WORKDIR /abs/../x",
    "WORKDIR",
    "USER 1000:1000",
    "USER $A",
    "RUN echo hi",
    "RUN [\"sh\", \"-c\", \"x\"]",
    "RUN --mount=type=cache,target=/c,mode=999 x",
    "RUN --mount=type=bind,from=b,target=/b x",
    "RUN --mount=from=9,target=/x x",
    "RUN --mount=type=secret x",
    "RUN --mount=type=tmpfs,target=/t,size=huge x",
    "RUN --network=none x",
    "RUN --network=x x",
    "RUN --mount x",
    "COPY --from=a /x /y",
    "COPY --from=b / /",
    "COPY --from=c / /",
    "COPY --from=7 / /",
    "COPY --from= / /",
    "COPY a",
    "COPY a b c/",
    "COPY <<EOF /f\nhello $A\nEOF",
    "ADD https://e.x/f /f",
    "ADD --checksum=x a /b",
    "COPY --chmod=u+x a /b",
    "COPY --chmod=zz a /b",
    "COPY --chown=$A a /b",
    "EXPOSE 80 1-3/udp 0-65535/x",
    "EXPOSE abc",
    "VOLUME /v",
    "VOLUME [\"\"]",
    "CMD x",
    "CMD [\"x\"]",
    "ENTRYPOINT [\"e\"]",
    "SHELL [\"/bin/ash\",\"-c\"]",
    "SHELL x",
    "SHELL []",
    "HEALTHCHECK NONE",
    "HEALTHCHECK --interval=5s --retries=x CMD true",
    "HEALTHCHECK CMD",
    "HEALTHCHECK BOGUS",
    "STOPSIGNAL 9",
    "ONBUILD RUN x",
    "ONBUILD ONBUILD RUN x",
    "ONBUILD FROM x",
    "MAINTAINER m",
    "RUN <<EOF\nscript\nEOF",
    "FETCH x",
    "COPY --frm=a b c",
    "COPY --link=maybe a b",
];

#[test]
fn lowering_random_dockerfiles_never_panics() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut lowered = 0;
    for case in 0..3000 {
        let n = 1 + (next() % 12) as usize;
        let mut src = String::new();
        for _ in 0..n {
            src.push_str(FRAGMENTS[(next() % FRAGMENTS.len() as u64) as usize]);
            src.push('\n');
        }
        let Ok(df) = kiln_dockerfile::parse(&src) else {
            continue;
        };
        let mut o = BuildOptions::for_context(".");
        o.platforms = vec![Platform::parse("linux/arm/v7").unwrap()];
        if case % 3 == 0 {
            o.target = Some(["a", "b", "c", "zz"][(next() % 4) as usize].to_string());
        }
        if case % 5 == 0 {
            o.build_args.insert("A".into(), "from-cli".into());
        }
        let _ = targets(&df);
        if let Ok(g) = lower(&df, &o, &["*.md".to_string()], &OfflineResolver) {
            lowered += 1;
            let p = plan(&g);
            assert!(
                p.steps
                    .iter()
                    .enumerate()
                    .all(|(i, s)| s.waits_on.iter().all(|w| (*w as usize) < i)),
                "{src}"
            );
            let _ = p.to_text();
        }
        let _ = lower_with_outline(&df, &o, &[], &OfflineResolver);
        let _ = kiln_dockerfile::lint::check(&df, &Default::default());
    }
    assert!(
        lowered > 50,
        "the generator should produce lowerable files too ({lowered})"
    );
}
