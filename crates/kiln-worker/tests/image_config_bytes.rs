//! The bytes of the image config kiln writes, pinned: a base image whose config sets every
//! field (Docker's extras included), a Dockerfile that sets every field again on top, and the
//! exact JSON `image_config` makes of the result. A change to how the frontend keeps the
//! config, or to how it is written, must not change these bytes (they are digests).

use kiln_graph::*;
use kiln_oci::Digest;

/// A base image's config with every field kiln models set, plus fields it does not model.
const BASE: &str = r#"{"architecture":"amd64","author":"someone","config":{"Hostname":"h","User":"base","ExposedPorts":{"22/tcp":{}},"Env":["PATH=/usr/bin:/bin","HOME=/root"],"Entrypoint":["/init"],"Cmd":["sh"],"Volumes":{"/data":{}},"WorkingDir":"/base","Labels":{"from":"base"},"StopSignal":"SIGINT","ArgsEscaped":true,"Healthcheck":{"Test":["CMD","true"],"Interval":0,"Timeout":-1,"StartPeriod":5,"Retries":2},"OnBuild":[],"Shell":["/bin/ash","-c"]},"container_config":{"Cmd":["/bin/sh"]},"created":"2020-01-01T00:00:00Z","docker_version":"24.0.0","history":[{"created":"2020-01-01T00:00:00Z","author":"someone","created_by":"ADD rootfs /"},{"created":"2020-01-01T00:00:01Z","comment":"meta","empty_layer":true}],"os":"linux","os.features":["f"],"os.version":"1","rootfs":{"type":"layers","diff_ids":["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]},"variant":"v8"}"#;

struct Base;

impl ImageConfigResolver for Base {
    fn resolve_image_config(
        &self,
        _reference: &str,
        _platform: &Platform,
    ) -> Result<ResolvedConfig, ResolveError> {
        let oci: kiln_oci::ImageConfig = serde_json::from_str(BASE).expect("base config parses");
        Ok(ResolvedConfig {
            digest: Some(format!("sha256:{}", "1".repeat(64))),
            config: oci,
        })
    }
}

fn written(dockerfile: &str) -> String {
    let df = kiln_dockerfile::parse(dockerfile).expect("test Dockerfile parses");
    let mut opts = BuildOptions::for_context("ctx");
    opts.platforms = vec![Platform::parse("linux/amd64").expect("platform")];
    let graph = lower(&df, &opts, &[], &Base).unwrap_or_else(|e| panic!("{e}"));
    let cfg = &graph.target_stage().config;
    let layers = vec![Digest::sha256_of(b"base"), Digest::sha256_of(b"run")];
    let oci = kiln_worker::image::image_config(cfg, layers, "1970-01-01T00:00:00Z");
    String::from_utf8(oci.to_bytes()).expect("utf-8")
}

#[test]
fn a_base_config_passed_through_is_written_as_before() {
    assert_eq!(
        written("FROM base\n"),
        r#"{"created":"1970-01-01T00:00:00Z","architecture":"amd64","os":"linux","variant":"v8","config":{"User":"base","ExposedPorts":{"22/tcp":{}},"Env":["PATH=/usr/bin:/bin","HOME=/root"],"Entrypoint":["/init"],"Cmd":["sh"],"Volumes":{"/data":{}},"WorkingDir":"/base","Labels":{"from":"base"},"StopSignal":"SIGINT","Healthcheck":{"Test":["CMD","true"],"StartPeriod":5,"Retries":2},"Shell":["/bin/ash","-c"]},"rootfs":{"type":"layers","diff_ids":["sha256:cae662172fd450bb0cd710a769079c05bfc5d8e35efa6576edc7d0377afdd4a2","sha256:acba25512100f80b56fc3ccd14c65be55d94800cda77585c5f41a887e398f9be"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"ADD rootfs /"},{"created":"1970-01-01T00:00:00Z","created_by":"","comment":"meta","empty_layer":true}]}"#
    );
}

#[test]
fn every_field_set_by_the_dockerfile_is_written_as_before() {
    let df = r#"FROM base
ENV A=1 PATH=/opt/bin:/bin
LABEL b="two words" a=1
EXPOSE 80 53/udp
VOLUME ["/var/lib/x", "/cache"]
WORKDIR app
USER 1000:1000
STOPSIGNAL SIGTERM
SHELL ["/bin/bash", "-ec"]
HEALTHCHECK --interval=30s --timeout=3s --start-period=1s --start-interval=2s --retries=4 CMD curl -f http://localhost/
ONBUILD RUN echo child
ENTRYPOINT ["/app/run"]
CMD ["--serve"]
RUN true
"#;
    assert_eq!(
        written(df),
        r#"{"created":"1970-01-01T00:00:00Z","architecture":"amd64","os":"linux","variant":"v8","config":{"User":"1000:1000","ExposedPorts":{"22/tcp":{},"53/udp":{},"80/tcp":{}},"Env":["PATH=/opt/bin:/bin","HOME=/root","A=1"],"Entrypoint":["/app/run"],"Cmd":["--serve"],"Volumes":{"/cache":{},"/data":{},"/var/lib/x":{}},"WorkingDir":"/base/app","Labels":{"a":"1","b":"two words","from":"base"},"StopSignal":"SIGTERM","Healthcheck":{"Test":["CMD-SHELL","curl -f http://localhost/"],"Interval":30000000000,"Timeout":3000000000,"StartPeriod":1000000000,"StartInterval":2000000000,"Retries":4},"OnBuild":["RUN echo child"],"Shell":["/bin/bash","-ec"]},"rootfs":{"type":"layers","diff_ids":["sha256:cae662172fd450bb0cd710a769079c05bfc5d8e35efa6576edc7d0377afdd4a2","sha256:acba25512100f80b56fc3ccd14c65be55d94800cda77585c5f41a887e398f9be"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"ADD rootfs /"},{"created":"1970-01-01T00:00:00Z","created_by":"","comment":"meta","empty_layer":true},{"created":"1970-01-01T00:00:00Z","created_by":"ENV A=1 PATH=/opt/bin:/bin","empty_layer":true},{"created":"1970-01-01T00:00:00Z","created_by":"LABEL b=two words a=1","empty_layer":true},{"created":"1970-01-01T00:00:00Z","created_by":"EXPOSE map[80/tcp:{} 53/udp:{}]","empty_layer":true},{"created":"1970-01-01T00:00:00Z","created_by":"VOLUME [/var/lib/x /cache]","empty_layer":true},{"created":"1970-01-01T00:00:00Z","created_by":"WORKDIR /base/app"},{"created":"1970-01-01T00:00:00Z","created_by":"USER 1000:1000","empty_layer":true},{"created":"1970-01-01T00:00:00Z","created_by":"STOPSIGNAL SIGTERM","empty_layer":true},{"created":"1970-01-01T00:00:00Z","created_by":"SHELL [\"/bin/bash\", \"-ec\"]","empty_layer":true},{"created":"1970-01-01T00:00:00Z","created_by":"HEALTHCHECK [\"CMD-SHELL\", \"curl -f http://localhost/\"]","empty_layer":true},{"created":"1970-01-01T00:00:00Z","created_by":"ONBUILD RUN echo child","empty_layer":true},{"created":"1970-01-01T00:00:00Z","created_by":"ENTRYPOINT [\"/app/run\"]","empty_layer":true},{"created":"1970-01-01T00:00:00Z","created_by":"CMD [\"--serve\"]","empty_layer":true},{"created":"1970-01-01T00:00:00Z","created_by":"RUN /bin/bash -ec true # buildkit"}]}"#
    );
}

#[test]
fn a_scratch_stage_writes_no_empty_fields() {
    assert_eq!(
        written("FROM scratch\nCMD [\"/x\"]\n"),
        r#"{"created":"1970-01-01T00:00:00Z","architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/x"]},"rootfs":{"type":"layers","diff_ids":["sha256:cae662172fd450bb0cd710a769079c05bfc5d8e35efa6576edc7d0377afdd4a2","sha256:acba25512100f80b56fc3ccd14c65be55d94800cda77585c5f41a887e398f9be"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"CMD [\"/x\"]","empty_layer":true}]}"#
    );
}
