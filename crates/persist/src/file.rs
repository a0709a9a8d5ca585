//! A [`Blob`] in a local directory: the embedded default.
//!
//! Each key is one file in the directory, its name the key with every byte
//! outside `[A-Za-z0-9_-]` written as `%XX` (so keys may contain `/`). A
//! `set` writes a temporary file (named with a leading `.`, which no encoded
//! key has), fsyncs it, renames it over the key's file and fsyncs the
//! directory, so a value is either wholly there or not at all, even after a
//! crash. Leftover temporary files from a crash are ignored by every read
//! and removed by the next [`FileBlob::open`] once they are an hour old.
//!
//! Keys are limited by the file system's name length (255 bytes for the
//! escaped name: about 250 plain characters, fewer with escapes); a longer
//! key gets a determinate error. Deletes are not fsynced: after a crash a
//! deleted value may reappear, and garbage collection deletes it again.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{ExternalError, chain};
use crate::location::{Blob, BlobMetadata, validate_blob_key};

/// The longest file name the common local file systems accept.
const MAX_NAME_BYTES: usize = 255;

/// Temporary files older than this are left over from a crash.
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

/// The prefix of temporary files (no encoded key starts with `.`).
const TEMP_PREFIX: &str = ".tmp-";

/// A [`Blob`] stored as files in one local directory.
#[derive(Clone, Debug)]
pub struct FileBlob {
    root: Arc<PathBuf>,
    /// The open directory, fsynced after every rename into it.
    dir: Arc<File>,
}

impl FileBlob {
    /// Opens the blob store in `root`, creating the directory if needed.
    ///
    /// Fails if `root` exists but is not a directory or cannot be created.
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self, ExternalError> {
        let root = root.into();
        let dir = root.clone();
        let handle = blocking(move || {
            let context = |what: &str| format!("{what} blob directory {}", dir.display());
            let existed = dir.exists();
            fs::create_dir_all(&dir).map_err(|e| io_error(&context("create"), e))?;
            let meta = fs::metadata(&dir).map_err(|e| io_error(&context("open"), e))?;
            if !meta.is_dir() {
                return Err(ExternalError::determinate(format!(
                    "{} is not a directory",
                    dir.display()
                )));
            }
            if !existed {
                // The new directory's entry is only durable once its parent is.
                if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                    sync_dir(parent).map_err(|e| io_error(&context("sync parent of"), e))?;
                }
            }
            remove_stale_temporaries(&dir);
            File::open(&dir).map_err(|e| io_error(&context("open"), e))
        })
        .await?;
        Ok(FileBlob {
            root: Arc::new(root),
            dir: Arc::new(handle),
        })
    }

    /// The directory holding the values.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file holding `key`, or an error if no file can hold it.
    fn path_of(&self, key: &str) -> Result<PathBuf, ExternalError> {
        validate_blob_key(key)?;
        let name = encode_key(key);
        if name.len() > MAX_NAME_BYTES {
            return Err(ExternalError::determinate(format!(
                "blob key too long for a file blob: {} bytes escaped, at most {MAX_NAME_BYTES}",
                name.len()
            )));
        }
        Ok(self.root.join(name))
    }
}

/// Runs blocking file system work off the async runtime's worker threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ExternalError> + Send + 'static,
) -> Result<T, ExternalError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ExternalError::indeterminate(format!("file blob task failed: {e}")))?
}

fn io_error(context: &str, err: io::Error) -> ExternalError {
    ExternalError::determinate(chain(context, &err))
}

/// Whether a key byte is written into a file name as it is.
fn is_plain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-'
}

/// Returns the file name that holds `key`.
fn encode_key(key: &str) -> String {
    let mut name = String::with_capacity(key.len());
    for &byte in key.as_bytes() {
        if is_plain(byte) {
            name.push(char::from(byte));
        } else {
            name.push_str(&format!("%{byte:02X}"));
        }
    }
    name
}

/// Returns the key held by the file `name`, or `None` if no key encodes to
/// it (temporary files and foreign files).
fn decode_key(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let mut key = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = name.get(i + 1..i + 3)?;
                let byte = u8::from_str_radix(hex, 16).ok()?;
                if is_plain(byte) || hex.bytes().any(|b| b.is_ascii_lowercase()) {
                    // Not the canonical encoding of any key.
                    return None;
                }
                key.push(byte);
                i += 3;
            }
            b if is_plain(b) => {
                key.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(key).ok()
}

#[async_trait]
impl Blob for FileBlob {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ExternalError> {
        let path = self.path_of(key)?;
        let key = key.to_owned();
        blocking(move || match fs::read(&path) {
            Ok(value) => Ok(Some(Bytes::from(value))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&format!("read blob {key}"), e)),
        })
        .await
    }

    async fn list_keys_and_metadata(
        &self,
        key_prefix: &str,
        f: &mut (dyn FnMut(BlobMetadata) + Send),
    ) -> Result<(), ExternalError> {
        let root = Arc::clone(&self.root);
        let prefix = key_prefix.to_owned();
        let found = blocking(move || {
            let entries = fs::read_dir(root.as_path())
                .map_err(|e| io_error(&format!("list blob directory {}", root.display()), e))?;
            let mut found = Vec::new();
            for entry in entries {
                let entry = entry
                    .map_err(|e| io_error(&format!("list blob directory {}", root.display()), e))?;
                let Some(key) = entry.file_name().to_str().and_then(decode_key) else {
                    continue;
                };
                if !key.starts_with(&prefix) {
                    continue;
                }
                match entry.metadata() {
                    Ok(meta) => found.push(BlobMetadata {
                        key,
                        size_in_bytes: meta.len(),
                    }),
                    // Deleted since the directory was read.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error(&format!("stat blob {key}"), e)),
                }
            }
            Ok(found)
        })
        .await?;
        found.into_iter().for_each(f);
        Ok(())
    }

    async fn set(&self, key: &str, value: Bytes) -> Result<(), ExternalError> {
        let root = Arc::clone(&self.root);
        let dir = Arc::clone(&self.dir);
        let path = self.path_of(key)?;
        let key = key.to_owned();
        blocking(move || {
            write_atomically(&root, &dir, &path, &value).map_err(|(applied, e)| {
                let message = chain(&format!("write blob {key}"), &e);
                if applied {
                    ExternalError::indeterminate(message)
                } else {
                    ExternalError::determinate(message)
                }
            })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<Option<usize>, ExternalError> {
        let path = self.path_of(key)?;
        let key = key.to_owned();
        blocking(move || {
            let size = match fs::metadata(&path) {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_error(&format!("stat blob {key}"), e)),
            };
            match fs::remove_file(&path) {
                Ok(()) => Ok(Some(usize::try_from(size).unwrap_or(usize::MAX))),
                // A concurrent delete won the race; the key is gone either way.
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_error(&format!("delete blob {key}"), e)),
            }
        })
        .await
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes temporary files a crashed writer left behind (best effort: a
/// failure here only leaves garbage).
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let is_temp = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TEMP_PREFIX));
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if is_temp && age.is_some_and(|age| age > STALE_TEMP_AGE) {
            match fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(path = %entry.path().display(), "removed stale temporary blob file")
                }
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove stale temporary file")
                }
            }
        }
    }
}

/// Writes `value` to `path` through a temporary file in `root` so that the
/// file appears whole or not at all, and is durable when this returns.
///
/// On error, also says whether the new value may already be visible.
fn write_atomically(
    root: &Path,
    dir: &File,
    path: &Path,
    value: &[u8],
) -> Result<(), (bool, io::Error)> {
    let tmp = root.join(format!("{TEMP_PREFIX}{}", uuid::Uuid::new_v4().simple()));
    let written = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(value)?;
        // Data and the size needed to read it back; the name comes next.
        file.sync_data()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err((false, e));
    }
    // The rename is only durable once the directory entry is.
    dir.sync_all().map_err(|e| (true, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::conformance::blob_conformance_tests!(async {
        let dir = tempfile::tempdir().unwrap().keep();
        Some(Arc::new(FileBlob::open(dir).await.unwrap()) as Arc<dyn Blob>)
    });

    #[test]
    fn key_encoding_roundtrips_and_hides_temporaries() {
        for key in [
            "",
            "a",
            "s123/w456/p789",
            "../etc/passwd",
            ".tmp-x",
            "üñí",
            "a%2Fb",
            "a b",
        ] {
            let name = encode_key(key);
            assert!(!name.starts_with('.'), "{name}");
            assert!(!name.contains('/'), "{name}");
            assert_eq!(decode_key(&name).as_deref(), Some(key), "{name}");
        }
        assert_eq!(decode_key(".tmp-abc"), None);
        assert_eq!(decode_key("%zz"), None);
        assert_eq!(
            decode_key("%41"),
            None,
            "non-canonical escape of a plain byte"
        );
        assert_eq!(decode_key("%2f"), None, "non-canonical lowercase escape");
    }

    #[tokio::test]
    async fn durable_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("file://{}", dir.path().display());
        crate::conformance::blob_durable_across_reopen(&uri).await;
    }

    #[tokio::test]
    async fn interrupted_writes_are_invisible() {
        let dir = tempfile::tempdir().unwrap();
        let blob = FileBlob::open(dir.path()).await.unwrap();
        blob.set("k", Bytes::from_static(b"complete"))
            .await
            .unwrap();
        // What a crash between write and rename leaves behind: a truncated
        // temporary file next to the real one.
        fs::write(dir.path().join(".tmp-deadbeef"), b"compl").unwrap();

        assert_eq!(
            blob.get("k").await.unwrap(),
            Some(Bytes::from_static(b"complete"))
        );
        let mut keys = Vec::new();
        blob.list_keys_and_metadata("", &mut |m| keys.push(m))
            .await
            .unwrap();
        assert_eq!(
            keys,
            vec![BlobMetadata {
                key: "k".into(),
                size_in_bytes: 8
            }]
        );
    }

    #[tokio::test]
    async fn unusable_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let blob = FileBlob::open(dir.path()).await.unwrap();
        let err = blob.set("", Bytes::new()).await.unwrap_err();
        assert!(
            err.is_determinate() && err.to_string().contains("must not be empty"),
            "{err}"
        );
        assert!(blob.get("").await.is_err());
        let long = "/".repeat(100);
        let err = blob.set(&long, Bytes::new()).await.unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
        let fits = "k".repeat(MAX_NAME_BYTES);
        blob.set(&fits, Bytes::from_static(b"v")).await.unwrap();
        assert_eq!(
            blob.get(&fits).await.unwrap(),
            Some(Bytes::from_static(b"v"))
        );
    }

    #[tokio::test]
    async fn stale_temporaries_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(format!("{TEMP_PREFIX}stale"));
        let fresh = dir.path().join(format!("{TEMP_PREFIX}fresh"));
        fs::write(&stale, b"x").unwrap();
        fs::write(&fresh, b"x").unwrap();
        let old = std::time::SystemTime::now() - 2 * STALE_TEMP_AGE;
        File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(old)
            .unwrap();
        FileBlob::open(dir.path()).await.unwrap();
        assert!(!stale.exists(), "a crashed writer's leftover is removed");
        assert!(fresh.exists(), "a concurrent writer's file is left alone");
    }

    #[tokio::test]
    async fn a_file_in_place_of_the_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-dir");
        fs::write(&path, b"x").unwrap();
        let err = FileBlob::open(&path).await.unwrap_err();
        assert!(err.is_determinate());
        assert!(err.to_string().contains("not-a-dir"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"x", "durable state unchanged");
    }
}
