//! A [`Blob`] in an S3 bucket (or any S3-compatible store), for several
//! processes and machines.
//!
//! Opened from `s3://bucket/prefix?endpoint=...&region=...`: every key is
//! stored under `prefix/`. Credentials come from the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) unless
//! the URI carries `access_key_id` and `secret_access_key`. With an explicit
//! `endpoint` (a local or self-hosted server) requests use path-style
//! addressing. Only the given endpoint (or AWS's regional one) is contacted:
//! no instance-metadata lookups.
//!
//! Values larger than [`S3BlobConfig::multipart_threshold`] are uploaded in
//! parts; S3 makes the object visible only when the upload completes, so a
//! `set` stays atomic.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::environment::EnvironmentVariableCredentialsProvider;
use aws_credential_types::Credentials;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use url::Url;

use crate::cfg::OpenError;
use crate::error::ExternalError;
use crate::location::{Blob, BlobMetadata, validate_blob_key};

/// The user-metadata key under which a multipart upload records its token.
const UPLOAD_TOKEN: &str = "persist-upload";

/// The region used when neither the URI nor `AWS_REGION` names one.
const DEFAULT_REGION: &str = "us-east-1";

/// How an [`S3Blob`] reaches its bucket.
#[derive(Clone, Debug)]
pub struct S3BlobConfig {
    /// The bucket holding the values.
    pub bucket: String,
    /// Prepended to every key; empty or ending in `/`.
    pub prefix: String,
    /// The service endpoint, e.g. `http://127.0.0.1:9000`; `None` for AWS.
    pub endpoint: Option<String>,
    /// The region to sign requests for.
    pub region: String,
    /// Explicit credentials; `None` reads them from the environment.
    pub credentials: Option<(String, String, Option<String>)>,
    /// Values at least this large are uploaded in parts. Bigger saves
    /// requests; smaller retries less data after a failure.
    pub multipart_threshold: usize,
    /// The size of each part of a multipart upload (at least 5 MiB, the S3
    /// minimum for all but the last part).
    pub multipart_part_size: usize,
    /// How many parts of one value are uploaded at once.
    pub multipart_concurrency: usize,
}

impl S3BlobConfig {
    /// Parses `s3://bucket/prefix?endpoint=...&region=...&access_key_id=...
    /// &secret_access_key=...&session_token=...` (all parameters optional).
    pub fn from_uri(uri: &str) -> Result<Self, OpenError> {
        let invalid = |reason: &str| OpenError::InvalidUri {
            uri: persist_types::redact_uri(uri),
            reason: reason.to_owned(),
        };
        let url = Url::parse(uri).map_err(|e| invalid(&e.to_string()))?;
        if url.scheme() != "s3" {
            return Err(invalid("expected the s3:// scheme"));
        }
        let bucket = url
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| invalid("missing bucket name"))?;
        let path = percent_encoding::percent_decode_str(url.path())
            .decode_utf8()
            .map_err(|e| invalid(&format!("prefix is not UTF-8: {e}")))?;
        let mut prefix = path.trim_start_matches('/').to_owned();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        let mut endpoint = None;
        let mut region = None;
        let (mut key_id, mut secret, mut token) = (None, None, None);
        for (name, value) in url.query_pairs() {
            let value = value.into_owned();
            match &*name {
                "endpoint" => endpoint = Some(value),
                "region" => region = Some(value),
                "access_key_id" => key_id = Some(value),
                "secret_access_key" => secret = Some(value),
                "session_token" => token = Some(value),
                other => {
                    return Err(invalid(&format!(
                        "unknown parameter {other:?} (expected endpoint, region, access_key_id, \
                         secret_access_key, session_token)"
                    )));
                }
            }
        }
        if let Some(endpoint) = &endpoint {
            let parsed = Url::parse(endpoint)
                .map_err(|e| invalid(&format!("endpoint {endpoint:?}: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(invalid(&format!(
                    "endpoint {endpoint:?} must be http:// or https://"
                )));
            }
        }
        let credentials = match (key_id, secret) {
            (Some(id), Some(secret)) => Some((id, secret, token)),
            (None, None) if token.is_none() => None,
            _ => {
                return Err(invalid(
                    "access_key_id and secret_access_key must be given together",
                ));
            }
        };
        let region = region
            .or_else(|| std::env::var("AWS_REGION").ok())
            .unwrap_or_else(|| DEFAULT_REGION.to_owned());
        Ok(S3BlobConfig {
            bucket: bucket.to_owned(),
            prefix,
            endpoint,
            region,
            credentials,
            multipart_threshold: 8 << 20,
            multipart_part_size: 8 << 20,
            multipart_concurrency: 4,
        })
    }

    /// Builds the SDK client this configuration describes (the one an
    /// [`S3Blob`] uses), e.g. to create the bucket in tests and tools.
    pub fn client(&self) -> Client {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(60))
            .build();
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(3));
        builder = match &self.credentials {
            Some((id, secret, token)) => builder.credentials_provider(Credentials::new(
                id,
                secret,
                token.clone(),
                None,
                "s3-uri",
            )),
            None => builder.credentials_provider(EnvironmentVariableCredentialsProvider::new()),
        };
        if let Some(endpoint) = &self.endpoint {
            builder = builder.endpoint_url(endpoint).force_path_style(true);
        }
        Client::from_conf(builder.build())
    }
}

/// A [`Blob`] in an S3 bucket under a key prefix.
#[derive(Clone, Debug)]
pub struct S3Blob {
    client: Client,
    cfg: Arc<S3BlobConfig>,
}

impl S3Blob {
    /// Connects to the bucket and checks that it exists and is reachable.
    pub async fn open(cfg: S3BlobConfig) -> Result<Self, OpenError> {
        let client = cfg.client();
        let uri = format!("s3://{}/{}", cfg.bucket, cfg.prefix);
        match client.head_bucket().bucket(&cfg.bucket).send().await {
            Ok(_) => Ok(S3Blob {
                client,
                cfg: Arc::new(cfg),
            }),
            Err(SdkError::ServiceError(e))
                if e.err().is_not_found() || e.raw().status().as_u16() == 404 =>
            {
                Err(OpenError::BucketNotFound {
                    bucket: cfg.bucket.clone(),
                    uri,
                })
            }
            Err(e) => Err(OpenError::Unavailable {
                uri,
                cause: sdk_error(&format!("check bucket {:?}", cfg.bucket), e, Request::Read),
            }),
        }
    }

    /// The configuration this blob was opened with.
    pub fn config(&self) -> &S3BlobConfig {
        &self.cfg
    }

    fn object_key(&self, key: &str) -> Result<String, ExternalError> {
        validate_blob_key(key)?;
        Ok(format!("{}{key}", self.cfg.prefix))
    }

    async fn put_multipart(&self, object: &str, value: Bytes) -> Result<(), ExternalError> {
        let context = format!("upload {object}");
        // Identifies this upload in the object's metadata, so a completion
        // whose response was lost or unparseable can be confirmed.
        let token = uuid::Uuid::new_v4().simple().to_string();
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(object)
            .metadata(UPLOAD_TOKEN, &token)
            .send()
            .await
            .map_err(|e| sdk_error(&context, e, Request::Write))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| {
                ExternalError::determinate(format!("{context}: server returned no upload id"))
            })?
            .to_owned();
        let parts = match self.upload_parts(object, &upload_id, value).await {
            Ok(parts) => parts,
            Err(err) => {
                self.abort_upload(object, &upload_id).await;
                return Err(err);
            }
        };
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(object)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        match completed {
            Ok(_) => Ok(()),
            Err(err) => {
                let err = sdk_error(&context, err, Request::Write);
                match self.uploaded_by(object, &token).await {
                    Some(true) => {
                        tracing::debug!(object, error = %err, "multipart completion confirmed despite error");
                        Ok(())
                    }
                    // The object is not ours: the upload did not complete
                    // (or was overwritten since, which linearizes the same).
                    Some(false) => {
                        self.abort_upload(object, &upload_id).await;
                        Err(ExternalError::determinate(err.message().to_owned()))
                    }
                    // Cannot tell: leave the upload alone, it may be done.
                    None => Err(ExternalError::indeterminate(err.message().to_owned())),
                }
            }
        }
    }

    /// Whether `object` currently holds the value of the upload `token`, or
    /// `None` if that cannot be found out.
    async fn uploaded_by(&self, object: &str, token: &str) -> Option<bool> {
        match self
            .client
            .head_object()
            .bucket(&self.cfg.bucket)
            .key(object)
            .send()
            .await
        {
            Ok(out) => Some(
                out.metadata()
                    .and_then(|m| m.get(UPLOAD_TOKEN))
                    .is_some_and(|t| t == token),
            ),
            Err(SdkError::ServiceError(e)) if e.err().is_not_found() => Some(false),
            Err(_) => None,
        }
    }

    /// Releases the parts of an upload that will not complete (best effort;
    /// a bucket lifecycle rule cleans up what this misses).
    async fn abort_upload(&self, object: &str, upload_id: &str) {
        let aborted = self
            .client
            .abort_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(object)
            .upload_id(upload_id)
            .send()
            .await;
        if let Err(abort) = aborted {
            tracing::warn!(object, error = %DisplayErrorContext(&abort), "failed to abort multipart upload");
        }
    }

    async fn upload_parts(
        &self,
        object: &str,
        upload_id: &str,
        value: Bytes,
    ) -> Result<Vec<CompletedPart>, ExternalError> {
        let part_size = self.cfg.multipart_part_size.max(5 << 20);
        let limit = Arc::new(Semaphore::new(self.cfg.multipart_concurrency.max(1)));
        let mut uploads = JoinSet::new();
        let mut offset = 0;
        let mut part_number = 1i32;
        while offset < value.len() {
            let end = (offset + part_size).min(value.len());
            let body = value.slice(offset..end);
            let request = self
                .client
                .upload_part()
                .bucket(&self.cfg.bucket)
                .key(object)
                .upload_id(upload_id)
                .part_number(part_number)
                .body(ByteStream::from(body));
            let limit = Arc::clone(&limit);
            let context = format!("upload part {part_number} of {object}");
            uploads.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let out = request
                    .send()
                    .await
                    .map_err(|e| sdk_error(&context, e, Request::Write))?;
                let e_tag = out.e_tag().ok_or_else(|| {
                    ExternalError::determinate(format!("{context}: server returned no ETag"))
                })?;
                Ok::<_, ExternalError>(
                    CompletedPart::builder()
                        .e_tag(e_tag)
                        .part_number(part_number)
                        .build(),
                )
            });
            offset = end;
            part_number += 1;
        }
        let mut parts = Vec::new();
        while let Some(joined) = uploads.join_next().await {
            let part = joined
                .map_err(|e| ExternalError::determinate(format!("upload task failed: {e}")))
                .and_then(|part| part);
            match part {
                Ok(part) => parts.push(part),
                Err(err) => {
                    // Stop the other parts before the caller aborts the
                    // upload, so none lands after the abort.
                    uploads.shutdown().await;
                    return Err(err);
                }
            }
        }
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }
}

/// Whether a failed request changed nothing, or may have changed something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    /// Reads change nothing, so their failures are determinate whenever the
    /// service answered.
    Read,
    /// The SDK retries writes, and an earlier attempt that timed out may
    /// have been applied before a later one failed: only a request that
    /// could not be built is certain not to have happened.
    Write,
}

/// Classifies an SDK error for a request of kind `request`.
fn sdk_error<E, R>(context: &str, err: SdkError<E, R>, request: Request) -> ExternalError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let message = format!("{context}: {}", DisplayErrorContext(&err));
    let determinate = matches!(
        (&err, request),
        (SdkError::ConstructionFailure(_), _) | (SdkError::ServiceError(_), Request::Read)
    );
    if determinate {
        ExternalError::determinate(message)
    } else {
        ExternalError::indeterminate(message)
    }
}

#[async_trait]
impl Blob for S3Blob {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ExternalError> {
        let object = self.object_key(key)?;
        let context = format!("get {object}");
        let out = match self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(&object)
            .send()
            .await
        {
            Ok(out) => out,
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => return Ok(None),
            Err(e) => return Err(sdk_error(&context, e, Request::Read)),
        };
        let expected = out.content_length();
        let value = out
            .body
            .collect()
            .await
            .map_err(|e| {
                ExternalError::indeterminate(format!(
                    "{context}: reading body: {}",
                    DisplayErrorContext(&e)
                ))
            })?
            .into_bytes();
        if let Some(expected) = expected
            && u64::try_from(expected).ok() != Some(value.len() as u64)
        {
            return Err(ExternalError::determinate(format!(
                "{context}: truncated value: expected {expected} bytes, received {}",
                value.len()
            )));
        }
        Ok(Some(value))
    }

    async fn list_keys_and_metadata(
        &self,
        key_prefix: &str,
        f: &mut (dyn FnMut(BlobMetadata) + Send),
    ) -> Result<(), ExternalError> {
        let full_prefix = format!("{}{key_prefix}", self.cfg.prefix);
        let context = format!("list {full_prefix}");
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.cfg.bucket)
            .prefix(&full_prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| sdk_error(&context, e, Request::Read))?;
            for object in page.contents() {
                let Some(key) = object.key().and_then(|k| k.strip_prefix(&self.cfg.prefix)) else {
                    continue;
                };
                let size = object
                    .size()
                    .and_then(|s| u64::try_from(s).ok())
                    .ok_or_else(|| {
                        ExternalError::determinate(format!("{context}: no size listed for {key}"))
                    })?;
                f(BlobMetadata {
                    key: key.to_owned(),
                    size_in_bytes: size,
                });
            }
        }
        Ok(())
    }

    async fn set(&self, key: &str, value: Bytes) -> Result<(), ExternalError> {
        let object = self.object_key(key)?;
        if value.len() >= self.cfg.multipart_threshold {
            return self.put_multipart(&object, value).await;
        }
        self.client
            .put_object()
            .bucket(&self.cfg.bucket)
            .key(&object)
            .body(ByteStream::from(value))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| sdk_error(&format!("put {object}"), e, Request::Write))
    }

    async fn delete(&self, key: &str) -> Result<Option<usize>, ExternalError> {
        let object = self.object_key(key)?;
        let size = match self
            .client
            .head_object()
            .bucket(&self.cfg.bucket)
            .key(&object)
            .send()
            .await
        {
            Ok(out) => out
                .content_length()
                .and_then(|s| usize::try_from(s).ok())
                .ok_or_else(|| {
                    ExternalError::determinate(format!("stat {object}: no content length"))
                })?,
            Err(SdkError::ServiceError(e)) if e.err().is_not_found() => return Ok(None),
            Err(e) => return Err(sdk_error(&format!("stat {object}"), e, Request::Read)),
        };
        self.client
            .delete_object()
            .bucket(&self.cfg.bucket)
            .key(&object)
            .send()
            .await
            .map_err(|e| sdk_error(&format!("delete {object}"), e, Request::Write))?;
        Ok(Some(size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    crate::conformance::blob_conformance_tests!(async {
        let uri = testing::s3_prefix().await?;
        let blob = S3Blob::open(S3BlobConfig::from_uri(&uri).unwrap())
            .await
            .unwrap();
        Some(Arc::new(blob) as Arc<dyn Blob>)
    });

    #[tokio::test]
    async fn durable_across_reopen() {
        let Some(uri) = testing::s3_prefix().await else {
            return;
        };
        crate::conformance::blob_durable_across_reopen(&uri).await;
    }

    #[tokio::test]
    async fn multipart_uploads_are_whole() {
        let Some(uri) = testing::s3_prefix().await else {
            return;
        };
        let mut cfg = S3BlobConfig::from_uri(&uri).unwrap();
        cfg.multipart_threshold = 6 << 20;
        cfg.multipart_part_size = 5 << 20;
        let blob = S3Blob::open(cfg).await.unwrap();
        let value: Bytes = (0..(17u32 << 20) / 4)
            .flat_map(|i| i.to_le_bytes())
            .collect::<Vec<u8>>()
            .into();
        blob.set("big", value.clone()).await.unwrap();
        assert_eq!(blob.get("big").await.unwrap(), Some(value));
    }

    #[tokio::test]
    async fn missing_bucket_is_named() {
        let Some(uri) = testing::s3_prefix().await else {
            return;
        };
        let mut cfg = S3BlobConfig::from_uri(&uri).unwrap();
        cfg.bucket = format!("no-such-bucket-{}", uuid::Uuid::new_v4().simple());
        let err = S3Blob::open(cfg.clone()).await.unwrap_err();
        assert!(
            matches!(err, OpenError::BucketNotFound { ref bucket, .. } if *bucket == cfg.bucket),
            "{err}"
        );
        assert!(err.to_string().contains(&cfg.bucket), "{err}");
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_a_clear_error() {
        let cfg = S3BlobConfig::from_uri(
            "s3://bucket/p?endpoint=http://127.0.0.1:1&region=us-east-1&access_key_id=a&secret_access_key=topsecret",
        )
        .unwrap();
        let err = S3Blob::open(cfg).await.unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, OpenError::Unavailable { .. }), "{message}");
        assert!(message.contains("bucket"), "{message}");
        assert!(!message.contains("topsecret"), "{message}");
    }

    #[test]
    fn uri_parsing() {
        let cfg = S3BlobConfig::from_uri(
            "s3://b/some/prefix?endpoint=http://localhost:9000&region=eu-west-1",
        )
        .unwrap();
        assert_eq!(cfg.bucket, "b");
        assert_eq!(cfg.prefix, "some/prefix/");
        assert_eq!(cfg.endpoint.as_deref(), Some("http://localhost:9000"));
        assert_eq!(cfg.region, "eu-west-1");
        assert!(cfg.credentials.is_none());
        assert_eq!(S3BlobConfig::from_uri("s3://b").unwrap().prefix, "");
        assert_eq!(
            S3BlobConfig::from_uri("s3://b/a%20b").unwrap().prefix,
            "a b/"
        );

        for (bad, why) in [
            ("s3:///prefix", "missing bucket"),
            ("s3://b/p?color=blue", "unknown parameter \"color\""),
            ("s3://b/p?endpoint=ftp://x", "must be http"),
            ("s3://b/p?access_key_id=x", "must be given together"),
            (
                "s3://b/p?secret_access_key=hunter2",
                "must be given together",
            ),
        ] {
            let err = S3BlobConfig::from_uri(bad).unwrap_err();
            let message = err.to_string();
            assert!(message.contains(why), "{bad}: {message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
    }
}
