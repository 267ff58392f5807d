//! Image assembly: a stage's config as the frontend left it, plus its layers, becomes an OCI
//! (or Docker) image config and manifest. The frontend works on the base image's config
//! itself (`kiln_oci::ImageConfig`); [`image_config`] writes what kiln keeps of it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use kiln_oci::config::RootFs;
use kiln_oci::{
    media_type, ContainerConfig, Descriptor, Digest, HealthConfig, History, ImageManifest,
};

/// One layer of a root filesystem: its blob, diff id and creation time. The same type the
/// remote cache stores, so a record moves between the local store and a cache ref unchanged.
pub use kiln_cache::CacheLayer as Layer;

/// An image's layers, bottom first, each with its diff id from the config; `None` when the
/// config and the manifest list different numbers of layers.
pub fn image_layers(config: &kiln_oci::ImageConfig, layers: &[Descriptor]) -> Option<Vec<Layer>> {
    (config.rootfs.diff_ids.len() == layers.len()).then(|| {
        config
            .rootfs
            .diff_ids
            .iter()
            .zip(layers)
            .map(|(d, l)| Layer {
                diff_id: d.clone(),
                blob: l.clone(),
                created: None,
            })
            .collect()
    })
}

/// The image's `created`: the newest of its layers' times, else `fallback`.
pub fn image_created(layers: &[Layer], fallback: String) -> String {
    layers
        .iter()
        .filter_map(|l| l.created.clone())
        .max()
        .unwrap_or(fallback)
}

/// The `created` timestamp: `SOURCE_DATE_EPOCH` when set (reproducible builds), else now.
pub fn created_timestamp(source_date_epoch: Option<u64>) -> String {
    let t = match source_date_epoch {
        Some(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        None => SystemTime::now(),
    };
    humantime::format_rfc3339_seconds(t).to_string()
}

fn non_empty<T: Clone>(v: &Option<Vec<T>>) -> Option<Vec<T>> {
    v.clone().filter(|v| !v.is_empty())
}

fn non_empty_map<V: Clone>(m: &Option<BTreeMap<String, V>>) -> Option<BTreeMap<String, V>> {
    m.clone().filter(|m| !m.is_empty())
}

fn non_empty_text(s: &Option<String>) -> Option<String> {
    s.clone().filter(|s| !s.is_empty())
}

/// Builds the image config of a finished stage from the config the frontend left (a base
/// image's config, edited). `history` entries with a layer must match `diff_ids` one to one;
/// entries of the base image come first. Only what kiln models is written: empty fields,
/// zero health-check durations and the base's unmodelled fields (Docker's
/// `container_config`, `os.version`, `Hostname`, ...) are left out, and every history entry
/// gets the image's `created`.
pub fn image_config(
    cfg: &kiln_oci::ImageConfig,
    diff_ids: Vec<Digest>,
    created: &str,
) -> kiln_oci::ImageConfig {
    let history = cfg
        .history
        .iter()
        .map(|h| History {
            created: Some(created.to_owned()),
            author: None,
            created_by: Some(h.created_by.clone().unwrap_or_default()),
            comment: h.comment.clone(),
            empty_layer: h.empty_layer,
        })
        .collect();
    let positive = |n: Option<i64>| n.filter(|n| *n > 0);
    let rt = cfg.runtime();
    let container = ContainerConfig {
        user: non_empty_text(&rt.user),
        exposed_ports: non_empty_map(&rt.exposed_ports),
        env: non_empty(&rt.env),
        entrypoint: rt.entrypoint.clone(),
        cmd: rt.cmd.clone(),
        volumes: non_empty_map(&rt.volumes),
        working_dir: non_empty_text(&rt.working_dir),
        labels: non_empty_map(&rt.labels),
        stop_signal: rt.stop_signal.clone(),
        args_escaped: None,
        healthcheck: rt.healthcheck.as_ref().map(|h| HealthConfig {
            test: Some(h.test.clone().unwrap_or_default()),
            interval: positive(h.interval),
            timeout: positive(h.timeout),
            start_period: positive(h.start_period),
            start_interval: positive(h.start_interval),
            retries: positive(h.retries),
        }),
        on_build: non_empty(&rt.on_build),
        shell: rt.shell.clone(),
        extra: BTreeMap::new(),
    };
    kiln_oci::ImageConfig {
        created: Some(created.to_owned()),
        author: None,
        architecture: cfg.architecture.clone(),
        os: cfg.os.clone(),
        os_version: None,
        os_features: vec![],
        variant: cfg.variant.clone(),
        config: Some(container),
        rootfs: RootFs {
            kind: "layers".into(),
            diff_ids,
        },
        history,
        extra: BTreeMap::new(),
    }
}

/// The manifest of an image: its config blob and layers, in OCI or Docker media types.
pub fn image_manifest(config: &[u8], layers: &[Layer], oci_media_types: bool) -> ImageManifest {
    let (manifest_type, config_type) = if oci_media_types {
        (media_type::OCI_MANIFEST, media_type::OCI_CONFIG)
    } else {
        (media_type::DOCKER_MANIFEST, media_type::DOCKER_CONFIG)
    };
    let layers = layers
        .iter()
        .map(|l| {
            let mut d = l.blob.clone();
            if !oci_media_types && d.media_type == media_type::OCI_LAYER_GZIP {
                d.media_type = media_type::DOCKER_LAYER_GZIP.to_owned();
            }
            d
        })
        .collect();
    ImageManifest {
        schema_version: 2,
        media_type: Some(manifest_type.to_owned()),
        artifact_type: None,
        config: Descriptor::of_bytes(config_type, config),
        layers,
        subject: None,
        annotations: BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use kiln_oci::config::EmptyObject;

    use super::*;

    #[test]
    fn source_date_epoch_fixes_created() {
        assert_eq!(created_timestamp(Some(0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            created_timestamp(Some(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
    }

    #[test]
    fn writing_a_written_config_again_gives_the_same_bytes() {
        let mut cfg = kiln_oci::ImageConfig {
            os: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        };
        cfg.runtime_mut().working_dir = Some("/app".into());
        cfg.runtime_mut().cmd = Some(vec!["php".into(), "-S".into(), "0.0.0.0:80".into()]);
        cfg.env_set("PATH", "/usr/bin:/bin");
        cfg.runtime_mut().exposed_ports = Some(BTreeMap::from([("80/tcp".into(), EmptyObject {})]));
        cfg.history.push(History {
            created_by: Some("RUN make".into()),
            ..History::default()
        });
        let oci = image_config(
            &cfg,
            vec![Digest::sha256_of(b"layer")],
            "1970-01-01T00:00:00Z",
        );
        let again = image_config(
            &oci,
            vec![Digest::sha256_of(b"layer")],
            "1970-01-01T00:00:00Z",
        );
        assert_eq!(again.to_bytes(), oci.to_bytes());
        assert_eq!(oci.env_get("PATH"), Some("/usr/bin:/bin"));
        assert_eq!(oci.runtime().working_dir(), "/app");
    }
}
