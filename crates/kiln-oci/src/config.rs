//! The image config blob (OCI image config plus Docker's extra fields), with `BTreeMap` maps
//! so that the same config always serializes to the same bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// An empty JSON object, the value type of `ExposedPorts` and `Volumes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmptyObject {}

/// The image config: what a container of this image runs and how its rootfs is made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// When the image was created (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// Who created the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// CPU architecture.
    pub architecture: String,
    /// Operating system.
    pub os: String,
    /// OS version.
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    /// OS features.
    #[serde(rename = "os.features", default, skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
    /// CPU variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The runtime configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ContainerConfig>,
    /// The layers' uncompressed digests.
    pub rootfs: RootFs,
    /// One entry per build step, including steps that made no layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
    /// Fields kiln does not model (Docker's `container_config`, `docker_version`, ...), kept so
    /// that a config read and written again keeps them.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The runtime part of an image config (Docker's capitalised field names, as the OCI spec
/// keeps them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    /// User (name or uid, optionally `:group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Ports to expose, `80/tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, EmptyObject>>,
    /// Environment, `KEY=value`, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// Entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<BTreeMap<String, EmptyObject>>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Signal that stops the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Docker: the command line is already escaped (Windows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_escaped: Option<bool>,
    /// Docker: health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthConfig>,
    /// Docker: instructions run by images built `FROM` this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_build: Option<Vec<String>>,
    /// Docker: the shell used by the shell form of RUN/CMD/ENTRYPOINT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
    /// Other runtime fields (Hostname, Tty, ...), kept as read.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Docker's health check. Durations are nanoseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthConfig {
    /// `["NONE"]`, `["CMD", args...]` or `["CMD-SHELL", command]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<Vec<String>>,
    /// Time between checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<i64>,
    /// Time before a check is considered hung.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    /// Grace period after start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period: Option<i64>,
    /// Interval during the start period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_interval: Option<i64>,
    /// Failures before unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<i64>,
}

/// The rootfs section: uncompressed layer digests, base first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Digest of each layer's uncompressed tar.
    pub diff_ids: Vec<Digest>,
}

impl Default for RootFs {
    fn default() -> Self {
        RootFs {
            kind: "layers".into(),
            diff_ids: Vec::new(),
        }
    }
}

/// One history entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// When the step ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// Who ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// The instruction, e.g. `RUN /bin/sh -c make`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// A comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// True when the step made no layer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

impl ImageConfig {
    /// Canonical bytes of this config (compact JSON, deterministic).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Plain data with string keys: serialization cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The runtime configuration, empty when the config has none.
    pub fn runtime(&self) -> &ContainerConfig {
        self.config.as_ref().unwrap_or(&EMPTY_RUNTIME)
    }

    /// The runtime configuration to edit, created empty when the config has none.
    pub fn runtime_mut(&mut self) -> &mut ContainerConfig {
        self.config.get_or_insert_with(ContainerConfig::default)
    }

    /// Looks up an environment variable of the runtime configuration.
    pub fn env_get(&self, key: &str) -> Option<&str> {
        self.runtime().env_get(key)
    }

    /// Sets an environment variable of the runtime configuration, in place if present.
    pub fn env_set(&mut self, key: &str, value: &str) {
        self.runtime_mut().env_set(key, value);
    }
}

/// What [`ImageConfig::runtime`] lends when a config has no runtime part.
static EMPTY_RUNTIME: ContainerConfig = ContainerConfig::EMPTY;

impl ContainerConfig {
    /// A runtime configuration with nothing set.
    pub const EMPTY: ContainerConfig = ContainerConfig {
        user: None,
        exposed_ports: None,
        env: None,
        entrypoint: None,
        cmd: None,
        volumes: None,
        working_dir: None,
        labels: None,
        stop_signal: None,
        args_escaped: None,
        healthcheck: None,
        on_build: None,
        shell: None,
        extra: BTreeMap::new(),
    };

    /// The user, `""` when none is set.
    pub fn user(&self) -> &str {
        self.user.as_deref().unwrap_or_default()
    }

    /// The working directory, `""` when none is set.
    pub fn working_dir(&self) -> &str {
        self.working_dir.as_deref().unwrap_or_default()
    }

    /// The environment, `KEY=value`, in order (empty when none is set).
    pub fn env(&self) -> &[String] {
        self.env.as_deref().unwrap_or_default()
    }

    /// The `ONBUILD` triggers (empty when none are set).
    pub fn on_build(&self) -> &[String] {
        self.on_build.as_deref().unwrap_or_default()
    }

    /// Looks up an environment variable.
    pub fn env_get(&self, key: &str) -> Option<&str> {
        self.env().iter().find_map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v)
        })
    }

    /// Sets an environment variable, replacing it in place if present, else appending it.
    pub fn env_set(&mut self, key: &str, value: &str) {
        let new = format!("{key}={value}");
        let env = self.env.get_or_insert_with(Vec::new);
        match env
            .iter_mut()
            .find(|kv| kv.split_once('=').is_some_and(|(k, _)| k == key))
        {
            Some(slot) => *slot = new,
            None => env.push(new),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKER_CONFIG: &str = r#"{"architecture":"amd64","config":{"Hostname":"","User":"app","ExposedPorts":{"8080/tcp":{},"443/tcp":{}},"Env":["PATH=/bin"],"Cmd":["sh"],"Healthcheck":{"Test":["CMD-SHELL","true"],"Interval":30000000000,"Retries":3},"ArgsEscaped":true,"OnBuild":["RUN echo hi"],"Shell":["/bin/ash","-c"],"StopSignal":"SIGTERM","Labels":{"z":"1","a":"2"}},"container_config":{"Cmd":["/bin/sh"]},"created":"2024-01-01T00:00:00Z","docker_version":"24.0.0","history":[{"created":"2024-01-01T00:00:00Z","created_by":"ADD rootfs /"},{"created_by":"CMD [\"sh\"]","empty_layer":true}],"os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]}}"#;

    #[test]
    fn docker_extra_fields_survive_a_round_trip() {
        let c: ImageConfig = serde_json::from_str(DOCKER_CONFIG).unwrap();
        let cc = c.config.as_ref().unwrap();
        assert_eq!(cc.healthcheck.as_ref().unwrap().retries, Some(3));
        assert_eq!(
            cc.on_build.as_deref(),
            Some(&["RUN echo hi".to_owned()][..])
        );
        assert_eq!(cc.shell.as_ref().unwrap()[0], "/bin/ash");
        assert_eq!(cc.args_escaped, Some(true));
        assert!(cc.extra.contains_key("Hostname"));
        assert!(c.extra.contains_key("container_config"));
        assert!(c.history[1].empty_layer);
        let again: ImageConfig = serde_json::from_slice(&c.to_bytes()).unwrap();
        assert_eq!(again, c);
        // Same value, same bytes; labels and ports come out sorted.
        assert_eq!(again.to_bytes(), c.to_bytes());
        let s = String::from_utf8(c.to_bytes()).unwrap();
        assert!(
            s.contains(r#""ExposedPorts":{"443/tcp":{},"8080/tcp":{}}"#),
            "{s}"
        );
        assert!(s.contains(r#""Labels":{"a":"2","z":"1"}"#), "{s}");
    }
}
