//! A small S3 client for kiln's object-storage backends (the registry's `s3` storage driver,
//! the `type=s3` build cache).
//!
//! [`S3Config`] says where a bucket is and who signs for it (an `s3://BUCKET/PREFIX` URL, the
//! AWS variables and files); [`S3Client`] sends the handful of requests kiln needs over
//! reqwest: objects whole or by range, listings, multipart uploads, presigned GETs. Requests
//! are signed (AWS Signature V4) by `rusty-s3`, which does no I/O of its own. Every key a
//! caller passes is relative to the configured prefix.

mod client;
mod config;
mod time;

pub use client::{ObjectMeta, ObjectStream, S3Client};
pub use config::{parse_s3_url, Credentials, S3Config, DEFAULT_REGION};

/// Why an S3 operation failed.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// An `s3://` or endpoint URL that cannot be used.
    #[error("invalid S3 URL `{url}`: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration is incomplete or unreadable (credentials, AWS files).
    #[error("S3 configuration: {0}")]
    Config(String),
    /// The request never got an answer (connection refused, reset, timed out).
    #[error("S3 {op} of `{key}`: {reason}")]
    Transport {
        /// The operation (`GET`, `UploadPart`).
        op: &'static str,
        /// The object key (with the prefix), or the prefix of a listing.
        key: String,
        /// What the HTTP client reported.
        reason: String,
    },
    /// The store answered with an error status.
    #[error("S3 {op} of `{key}`: HTTP {status} {code}: {message}")]
    Status {
        /// The operation (`GET`, `UploadPart`).
        op: &'static str,
        /// The object key (with the prefix), or the prefix of a listing.
        key: String,
        /// The HTTP status.
        status: u16,
        /// The S3 error code (`NoSuchUpload`, `AccessDenied`), or empty.
        code: String,
        /// The store's message, or empty.
        message: String,
    },
    /// A successful answer whose body or headers could not be understood.
    #[error("S3 {op} of `{key}`: unreadable response: {reason}")]
    Response {
        /// The operation.
        op: &'static str,
        /// The object key (with the prefix).
        key: String,
        /// What was wrong with it.
        reason: String,
    },
}

impl S3Error {
    /// The HTTP status of a [`S3Error::Status`] error.
    pub fn status(&self) -> Option<u16> {
        match self {
            S3Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The S3 error code of a [`S3Error::Status`] error (`NoSuchUpload`).
    pub fn code(&self) -> Option<&str> {
        match self {
            S3Error::Status { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The object key the failed operation was about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            S3Error::Transport { key, .. }
            | S3Error::Status { key, .. }
            | S3Error::Response { key, .. } => Some(key),
            _ => None,
        }
    }
}
