//! The canonical bytes of representative ops, pinned. A vertex's cache key is
//! `sha256(canonical_op ‖ input keys)`, so any change to these bytes (a renamed field, a
//! differently spelled enum value, a reordered struct) silently invalidates every cache a
//! user has, local and remote. A failure here means the op encoding changed: that must be a
//! deliberate cache-format change, never a side effect of a refactor.

use kiln_graph::*;

const DOCKERFILE: &str = "\
FROM busybox AS build
RUN --mount=type=cache,target=/root/.cache,sharing=locked,id=pip,mode=0750,uid=1,gid=2 \
    --mount=type=secret,id=token,env=TOKEN,required \
    --mount=type=tmpfs,target=/tmp,size=64m \
    --mount=type=ssh \
    --network=none --security=insecure make
FROM busybox
WORKDIR /app
COPY --from=build --chown=1:2 /out /app/
ADD --chmod=0644 --link a.tar /srv/
RUN --mount=type=bind,from=build,source=/out,target=/in,rw --network=default ls /in
";

fn ops() -> Vec<String> {
    let df = kiln_dockerfile::parse(DOCKERFILE).expect("the pinned Dockerfile parses");
    let mut opts = BuildOptions::for_context("ctx");
    opts.platforms = vec![Platform::parse("linux/amd64").expect("valid platform")];
    // `RUN --security=insecure` needs the entitlement; granting it leaves the op as it was.
    opts.entitlements.security_insecure = true;
    let graph = lower(&df, &opts, &["*.log".to_string()], &OfflineResolver)
        .expect("the pinned Dockerfile lowers");
    graph
        .vertices
        .iter()
        .map(|v| String::from_utf8(v.canonical_op()).expect("canonical ops are JSON text"))
        .collect()
}

#[test]
fn canonical_op_bytes_of_representative_ops_do_not_change() {
    let got = ops();
    let expected: &[&str] = &[
        r#"{"op":"image","reference":"docker.io/library/busybox:latest","platform":{"os":"linux","architecture":"amd64"},"digest":null}"#,
        r#"{"op":"exec","rootfs":0,"args":["/bin/sh","-c","make"],"env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"cwd":"/","user":"","network":"none","security":"insecure","mounts":[{"target":"/root/.cache","kind":{"type":"cache","id":"pip","sharing":"locked","input":null,"source":"","readonly":false,"uid":1,"gid":2,"mode":488}},{"target":"","kind":{"type":"secret","id":"token","env":"TOKEN","required":true,"uid":0,"gid":0,"mode":256}},{"target":"/tmp","kind":{"type":"tmpfs","size":67108864}},{"target":"/run/buildkit/ssh_agent.0","kind":{"type":"ssh","id":"default","required":false,"uid":0,"gid":0,"mode":384}}]}"#,
        r#"{"op":"image","reference":"docker.io/library/busybox:latest","platform":{"os":"linux","architecture":"amd64"},"digest":null}"#,
        r#"{"op":"mkdir","rootfs":0,"path":"/app","mode":493,"owner":null}"#,
        r#"{"op":"copy","dest_base":0,"source":{"kind":"input","input":1},"srcs":["/out"],"dest":"/app/","dest_is_dir":true,"chown":{"user":"1","group":"2"},"chmod":null,"link":false,"parents":false,"exclude":[],"auto_extract":false,"keep_git_dir":false,"is_add":false}"#,
        r#"{"op":"local","name":"context","include":[],"exclude":["*.log"]}"#,
        r#"{"op":"copy","dest_base":null,"source":{"kind":"input","input":0},"srcs":["a.tar"],"dest":"/srv/","dest_is_dir":true,"chown":null,"chmod":"0644","link":true,"parents":false,"exclude":[],"auto_extract":true,"keep_git_dir":false,"is_add":true}"#,
        r#"{"op":"merge"}"#,
        r#"{"op":"exec","rootfs":0,"args":["/bin/sh","-c","ls /in"],"env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"cwd":"/app","user":"","network":"default","security":"sandbox","mounts":[{"target":"/in","kind":{"type":"bind","input":1,"source":"/out","readonly":false}}]}"#,
    ];
    assert_eq!(got, expected);
}
