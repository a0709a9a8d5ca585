//! Opening backends from URIs.

use std::path::PathBuf;
use std::sync::Arc;

use persist_types::redact_uri;
use url::Url;

use crate::error::ExternalError;
use crate::file::FileBlob;
use crate::location::{Blob, Consensus};
use crate::mem::{MemBlob, MemConsensus};
use crate::postgres::PostgresConsensus;
use crate::s3::{S3Blob, S3BlobConfig};
use crate::sqlite::SqliteConsensus;

/// The blob URI schemes [`open_blob`] understands.
pub const BLOB_SCHEMES: &str = "mem://, file://, s3://";
/// The consensus URI schemes [`open_consensus`] understands.
pub const CONSENSUS_SCHEMES: &str = "mem://, sqlite://, postgres://, postgresql://";

/// Why a backend could not be opened. Every message names the URI, with
/// secrets masked.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URI is malformed or has invalid parameters.
    #[error("invalid uri {uri}: {reason}")]
    InvalidUri {
        /// The URI, secrets masked.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The URI's scheme names no backend of this kind.
    #[error("unsupported {kind} uri scheme {scheme:?} in {uri}: expected one of {expected}")]
    UnsupportedScheme {
        /// `blob` or `consensus`.
        kind: &'static str,
        /// The scheme found.
        scheme: String,
        /// The URI, secrets masked.
        uri: String,
        /// The schemes that would have been understood.
        expected: &'static str,
    },
    /// The S3 bucket does not exist (or is not visible with these
    /// credentials).
    #[error("s3 bucket {bucket:?} does not exist ({uri})")]
    BucketNotFound {
        /// The bucket name.
        bucket: String,
        /// The URI, secrets masked.
        uri: String,
    },
    /// The backend was reachable in principle but opening it failed: the
    /// server is down, the file is not a database, permissions, ...
    #[error("could not open {uri}: {cause}")]
    Unavailable {
        /// The URI, secrets masked.
        uri: String,
        /// The underlying failure.
        cause: ExternalError,
    },
}

fn parse(uri: &str) -> Result<Url, OpenError> {
    Url::parse(uri).map_err(|e| OpenError::InvalidUri {
        uri: redact_uri(uri),
        reason: e.to_string(),
    })
}

/// Returns the local path of a `file://` or `sqlite://` URI, which must be
/// absolute and have no host, query or fragment.
fn local_path(uri: &str, url: &Url) -> Result<PathBuf, OpenError> {
    let invalid = |reason: &str| OpenError::InvalidUri {
        uri: redact_uri(uri),
        reason: reason.to_owned(),
    };
    if url.host_str().is_some_and(|h| !h.is_empty()) {
        return Err(invalid(
            "expected an absolute path with three slashes, e.g. file:///var/lib/persist",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("a local path takes no query or fragment"));
    }
    let path = url
        .to_file_path()
        .map_err(|()| invalid("not a local path"))?;
    if path.as_os_str().len() <= 1 {
        return Err(invalid("the path must not be the root directory"));
    }
    Ok(path)
}

fn mem_only(uri: &str, url: &Url) -> Result<(), OpenError> {
    if url.host_str().is_some_and(|h| !h.is_empty())
        || !matches!(url.path(), "" | "/")
        || url.query().is_some()
    {
        return Err(OpenError::InvalidUri {
            uri: redact_uri(uri),
            reason: "mem:// takes no host, path or parameters".to_owned(),
        });
    }
    Ok(())
}

fn unavailable(uri: &str) -> impl FnOnce(ExternalError) -> OpenError + '_ {
    move |cause| OpenError::Unavailable {
        uri: redact_uri(uri),
        cause,
    }
}

/// Opens the [`Blob`] named by `uri` (`mem://`, `file:///abs/dir`,
/// `s3://bucket/prefix?...`).
///
/// `mem://` opens a new, empty store each time. Opening checks that the
/// store is usable (the directory can be created, the bucket exists) and
/// changes nothing durable beyond creating an empty directory.
pub async fn open_blob(uri: &str) -> Result<Arc<dyn Blob>, OpenError> {
    let url = parse(uri)?;
    match url.scheme() {
        "mem" => {
            mem_only(uri, &url)?;
            Ok(Arc::new(MemBlob::new()))
        }
        "file" => {
            let path = local_path(uri, &url)?;
            Ok(Arc::new(
                FileBlob::open(path).await.map_err(unavailable(uri))?,
            ))
        }
        "s3" => Ok(Arc::new(S3Blob::open(S3BlobConfig::from_uri(uri)?).await?)),
        scheme => Err(OpenError::UnsupportedScheme {
            kind: "blob",
            scheme: scheme.to_owned(),
            uri: redact_uri(uri),
            expected: BLOB_SCHEMES,
        }),
    }
}

/// Opens the [`Consensus`] named by `uri` (`mem://`, `sqlite:///abs/file.db`,
/// `postgres://user@host:port/db`).
///
/// `mem://` opens a new, empty log each time. Opening checks that the
/// backend answers and creates its schema if missing; it never changes
/// existing entries.
pub async fn open_consensus(uri: &str) -> Result<Arc<dyn Consensus>, OpenError> {
    let url = parse(uri)?;
    match url.scheme() {
        "mem" => {
            mem_only(uri, &url)?;
            Ok(Arc::new(MemConsensus::new()))
        }
        "sqlite" => {
            let path = local_path(uri, &url)?;
            Ok(Arc::new(
                SqliteConsensus::open(path)
                    .await
                    .map_err(unavailable(uri))?,
            ))
        }
        "postgres" | "postgresql" => Ok(Arc::new(PostgresConsensus::open(uri).await?)),
        scheme => Err(OpenError::UnsupportedScheme {
            kind: "consensus",
            scheme: scheme.to_owned(),
            uri: redact_uri(uri),
            expected: CONSENSUS_SCHEMES,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn blob_err(uri: &str) -> String {
        open_blob(uri).await.unwrap_err().to_string()
    }

    async fn consensus_err(uri: &str) -> String {
        open_consensus(uri).await.unwrap_err().to_string()
    }

    #[tokio::test]
    async fn malformed_uris_are_named() {
        let err = blob_err("not a uri").await;
        assert!(err.starts_with("invalid uri not a uri"), "{err}");
        let err = consensus_err("postgres://u:hunter2@[::1/db").await;
        assert!(err.contains("invalid uri"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = blob_err("file://relative/dir").await;
        assert!(err.contains("three slashes"), "{err}");
        let err = blob_err("file:///").await;
        assert!(err.contains("root directory"), "{err}");
        let err = consensus_err("sqlite:///tmp/x.db?mode=ro").await;
        assert!(err.contains("no query"), "{err}");
        let err = blob_err("mem://somewhere").await;
        assert!(err.contains("mem:// takes no host"), "{err}");
    }

    #[tokio::test]
    async fn unknown_schemes_list_the_known_ones() {
        let err = blob_err("gcs://bucket/x").await;
        assert!(err.contains("unsupported blob uri scheme \"gcs\""), "{err}");
        assert!(err.contains("s3://"), "{err}");
        let err = consensus_err("file:///tmp/x").await;
        assert!(
            err.contains("unsupported consensus uri scheme \"file\""),
            "{err}"
        );
        assert!(err.contains("sqlite://"), "{err}");
        let err = blob_err("postgres://localhost/db").await;
        assert!(err.contains("unsupported blob uri scheme"), "{err}");
    }

    #[tokio::test]
    async fn local_uris_open() {
        let dir = tempfile::tempdir().unwrap();
        let blob = open_blob(&format!("file://{}/blob", dir.path().display()))
            .await
            .unwrap();
        blob.set("k", bytes::Bytes::from_static(b"v"))
            .await
            .unwrap();
        assert!(dir.path().join("blob").join("k").exists());
        let consensus = open_consensus(&format!("sqlite://{}/c.db", dir.path().display()))
            .await
            .unwrap();
        assert_eq!(consensus.head("k").await.unwrap(), None);
        open_blob("mem://").await.unwrap();
        open_consensus("mem://").await.unwrap();
    }

    #[tokio::test]
    async fn unwritable_locations_are_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let err = blob_err(&format!("file://{}/sub", file.display())).await;
        assert!(err.starts_with("could not open file://"), "{err}");
        let err = consensus_err(&format!("sqlite://{}/sub/c.db", file.display())).await;
        assert!(err.starts_with("could not open sqlite://"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
}
