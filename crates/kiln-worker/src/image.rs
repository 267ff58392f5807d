//! Image assembly: a stage's config as the frontend left it, plus its layers, becomes an OCI
//! (or Docker) image config and manifest; and a pulled image's config becomes what the
//! frontend needs to lower `FROM` (ENV, WORKDIR, USER, ONBUILD, SHELL, history).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use kiln_graph::graph::{Healthcheck, HistoryEntry};
use kiln_oci::config::{EmptyObject, RootFs};
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

fn non_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

fn set_of(items: &std::collections::BTreeSet<String>) -> Option<BTreeMap<String, EmptyObject>> {
    (!items.is_empty()).then(|| items.iter().map(|k| (k.clone(), EmptyObject {})).collect())
}

/// Builds the image config of a finished stage. `history` entries with a layer must match
/// `diff_ids` one to one; entries of the base image come first.
pub fn image_config(
    cfg: &kiln_graph::ImageConfig,
    diff_ids: Vec<Digest>,
    created: &str,
) -> kiln_oci::ImageConfig {
    let history = cfg
        .history
        .iter()
        .map(|h| History {
            created: Some(created.to_owned()),
            author: None,
            created_by: Some(h.created_by.clone()),
            comment: h.comment.clone(),
            empty_layer: h.empty_layer,
        })
        .collect();
    let container = ContainerConfig {
        user: (!cfg.user.is_empty()).then(|| cfg.user.clone()),
        exposed_ports: set_of(&cfg.exposed_ports),
        env: non_empty(cfg.env.clone()),
        entrypoint: cfg.entrypoint.clone(),
        cmd: cfg.cmd.clone(),
        volumes: set_of(&cfg.volumes),
        working_dir: (!cfg.working_dir.is_empty()).then(|| cfg.working_dir.clone()),
        labels: (!cfg.labels.is_empty()).then(|| cfg.labels.clone()),
        stop_signal: cfg.stop_signal.clone(),
        args_escaped: None,
        healthcheck: cfg.healthcheck.as_ref().map(|h| HealthConfig {
            test: Some(h.test.clone()),
            interval: (h.interval > 0).then_some(h.interval as i64),
            timeout: (h.timeout > 0).then_some(h.timeout as i64),
            start_period: (h.start_period > 0).then_some(h.start_period as i64),
            start_interval: (h.start_interval > 0).then_some(h.start_interval as i64),
            retries: (h.retries > 0).then_some(h.retries as i64),
        }),
        on_build: non_empty(cfg.on_build.clone()),
        shell: cfg.shell.clone(),
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

/// What the frontend needs from a base image's config.
pub fn frontend_config(c: &kiln_oci::ImageConfig) -> kiln_graph::ImageConfig {
    let cc = c.config.clone().unwrap_or_default();
    kiln_graph::ImageConfig {
        env: cc.env.unwrap_or_default(),
        cmd: cc.cmd,
        entrypoint: cc.entrypoint,
        working_dir: cc.working_dir.unwrap_or_default(),
        user: cc.user.unwrap_or_default(),
        labels: cc.labels.unwrap_or_default(),
        exposed_ports: cc.exposed_ports.unwrap_or_default().into_keys().collect(),
        volumes: cc.volumes.unwrap_or_default().into_keys().collect(),
        stop_signal: cc.stop_signal,
        healthcheck: cc.healthcheck.map(|h| Healthcheck {
            test: h.test.unwrap_or_default(),
            interval: h.interval.unwrap_or(0).max(0) as u64,
            timeout: h.timeout.unwrap_or(0).max(0) as u64,
            start_period: h.start_period.unwrap_or(0).max(0) as u64,
            start_interval: h.start_interval.unwrap_or(0).max(0) as u64,
            retries: h.retries.unwrap_or(0).max(0) as u32,
        }),
        shell: cc.shell,
        on_build: cc.on_build.unwrap_or_default(),
        history: c
            .history
            .iter()
            .map(|h| HistoryEntry {
                created_by: h.created_by.clone().unwrap_or_default(),
                empty_layer: h.empty_layer,
                comment: h.comment.clone(),
            })
            .collect(),
        os: c.os.clone(),
        architecture: c.architecture.clone(),
        variant: c.variant.clone(),
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
    fn config_round_trips_through_the_frontend_form() {
        let mut cfg = kiln_graph::ImageConfig {
            os: "linux".into(),
            architecture: "amd64".into(),
            working_dir: "/app".into(),
            cmd: Some(vec!["php".into(), "-S".into(), "0.0.0.0:80".into()]),
            ..Default::default()
        };
        cfg.env_set("PATH", "/usr/bin:/bin");
        cfg.exposed_ports.insert("80/tcp".into());
        cfg.history.push(HistoryEntry {
            created_by: "RUN make".into(),
            empty_layer: false,
            comment: None,
        });
        let oci = image_config(
            &cfg,
            vec![Digest::sha256_of(b"layer")],
            "1970-01-01T00:00:00Z",
        );
        let back = frontend_config(&oci);
        assert_eq!(back, cfg);
        let again = image_config(
            &back,
            vec![Digest::sha256_of(b"layer")],
            "1970-01-01T00:00:00Z",
        );
        assert_eq!(again.to_bytes(), oci.to_bytes());
    }
}
