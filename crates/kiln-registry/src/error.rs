//! Errors: the OCI distribution error codes sent to clients, and the typed error of the
//! library API (start-up, configuration, GC).

use std::path::PathBuf;

use hyper::StatusCode;

/// The error codes of the OCI distribution spec ("Error Codes" table), plus the few that
/// distribution added and clients know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Unsupported,
    TagInvalid,
    /// Too many requests of a kind (open uploads past their bound); status 429.
    TooManyRequests,
}

impl Code {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Code::BlobUnknown => "BLOB_UNKNOWN",
            Code::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Code::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Code::ManifestInvalid => "MANIFEST_INVALID",
            Code::ManifestUnknown => "MANIFEST_UNKNOWN",
            Code::NameInvalid => "NAME_INVALID",
            Code::NameUnknown => "NAME_UNKNOWN",
            Code::SizeInvalid => "SIZE_INVALID",
            Code::Unauthorized => "UNAUTHORIZED",
            Code::Unsupported => "UNSUPPORTED",
            Code::TagInvalid => "TAG_INVALID",
            Code::TooManyRequests => "TOOMANYREQUESTS",
        }
    }

    /// The status code distribution (and the spec's conformance suite) pairs with the code.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Code::BlobUnknown
            | Code::BlobUploadUnknown
            | Code::ManifestUnknown
            | Code::NameUnknown => StatusCode::NOT_FOUND,
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            Code::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// An error answered to a client as `{"errors":[{"code","message","detail"}]}`. Boxed so
/// `Result<_, ApiError>` stays small on the hot path.
#[derive(Debug)]
pub(crate) struct ApiError(Box<ApiErrorBody>);

impl std::ops::Deref for ApiError {
    type Target = ApiErrorBody;
    fn deref(&self) -> &ApiErrorBody {
        &self.0
    }
}

impl std::ops::DerefMut for ApiError {
    fn deref_mut(&mut self) -> &mut ApiErrorBody {
        &mut self.0
    }
}

/// The parts of an [`ApiError`].
#[derive(Debug)]
pub(crate) struct ApiErrorBody {
    pub(crate) status: StatusCode,
    pub(crate) code: Code,
    pub(crate) message: String,
    pub(crate) detail: serde_json::Value,
    /// `WWW-Authenticate` challenge for 401 answers.
    pub(crate) challenge: Option<String>,
}

impl ApiError {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Self {
        ApiError(Box::new(ApiErrorBody {
            status: code.status(),
            code,
            message: message.into(),
            detail: serde_json::Value::Null,
            challenge: None,
        }))
    }

    pub(crate) fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub(crate) fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }

    /// A server-side failure (disk full, I/O error): 500 without leaking paths to clients
    /// beyond what the operator log line already has.
    pub(crate) fn internal(what: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!("{what}: {err}");
        ApiError(Box::new(ApiErrorBody {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: Code::Unsupported,
            message: format!("{what}: internal storage error"),
            detail: serde_json::Value::Null,
            challenge: None,
        }))
    }

    pub(crate) fn body(&self) -> Vec<u8> {
        let code = if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            "UNKNOWN"
        } else {
            self.code.as_str()
        };
        let v = serde_json::json!({
            "errors": [{ "code": code, "message": self.message, "detail": self.detail }]
        });
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

/// Why the registry could not start, load its configuration or collect garbage.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A filesystem operation on the registry root failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A storage operation failed (GC, or opening a driver); `location` is where the
    /// storage lives (a directory, a bucket).
    #[error("{what} {location}: {source}")]
    Storage {
        what: &'static str,
        location: String,
        #[source]
        source: crate::storage::StorageError,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source} (is another server using the port?)")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be loaded.
    #[error("TLS setup with certificate {cert} and key {key} failed: {reason}")]
    Tls {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    /// The htpasswd file is unreadable or has a malformed line.
    #[error("htpasswd file {path}:{line}: {reason}")]
    Htpasswd {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// The configuration is inconsistent or could not be parsed.
    #[error("registry configuration: {0}")]
    Config(String),
}

impl RegistryError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RegistryError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
