//! Finding the real servers the PostgreSQL and S3 tests run against
//! (available with the `testing` feature).
//!
//! `cargo xtask services up` starts them and writes their addresses to
//! `.services.env` at the workspace root; `cargo xtask test` also exports
//! them. A test whose server is not configured is skipped with a message,
//! except under `CI=true`, where it fails: CI must never pass by skipping.
//!
//! [`bench`] holds the measuring helpers the benchmarks share.

// Skips are announced on stderr, where the test harness shows them.
#![allow(clippy::print_stderr)]

pub mod bench;

use std::path::Path;

use url::Url;

use crate::s3::S3BlobConfig;

/// The bucket the S3 tests share; each test uses its own prefix in it.
const TEST_BUCKET: &str = "persist-test";

/// Returns the service setting `name`, from the environment or from the
/// `.services.env` file written by `cargo xtask services up`.
pub fn service_var(name: &str) -> Option<String> {
    if let Some(value) = std::env::var(name).ok().filter(|v| !v.is_empty()) {
        return Some(value);
    }
    let env_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.services.env");
    let contents = std::fs::read_to_string(env_file).ok()?;
    contents
        .lines()
        .filter_map(|line| line.split_once('='))
        .find(|(key, _)| key.trim() == name)
        .map(|(_, value)| value.trim().to_owned())
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns the setting, or `None` (after saying so) when it is missing
/// outside CI. Panics when it is missing under CI.
pub fn require(name: &str, server: &str) -> Option<String> {
    match service_var(name) {
        Some(value) => Some(value),
        None if under_ci() => panic!(
            "{name} is not set but CI=true: the {server} tests need a real server \
             (run them with `cargo xtask test`, which starts it)"
        ),
        None => {
            eprintln!(
                "SKIPPED: {name} is not set; run `cargo xtask services up` to test against {server}"
            );
            None
        }
    }
}

/// Creates a new, empty database on the test PostgreSQL server and returns
/// its URI; `None` if no server is configured (see [`require`]).
///
/// Panics if the server is configured but unusable: this is test setup.
pub async fn postgres_database() -> Option<String> {
    let base = require("PERSIST_TEST_POSTGRES_URL", "PostgreSQL")?;
    let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL server at {base}: {e}"));
    tokio::spawn(connection);
    let name = format!("persist_test_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("cannot create a test database at {base}: {e}"));
    let mut url = Url::parse(&base).expect("the test server URL parsed once already");
    url.set_path(&format!("/{name}"));
    Some(url.to_string())
}

/// Returns an `s3://` URI for a fresh prefix in the test bucket on the test
/// S3 server, creating the bucket if needed; `None` if no server is
/// configured (see [`require`]).
///
/// Panics if the server is configured but unusable: this is test setup.
pub async fn s3_prefix() -> Option<String> {
    let endpoint = require("PERSIST_TEST_S3_ENDPOINT", "S3")?;
    let key_id = service_var("AWS_ACCESS_KEY_ID").unwrap_or_else(|| "persist-test".to_owned());
    let secret = service_var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|| "persist-test".to_owned());
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("endpoint", &endpoint)
        .append_pair("region", "us-east-1")
        .append_pair("access_key_id", &key_id)
        .append_pair("secret_access_key", &secret)
        .finish();
    let uri = format!(
        "s3://{TEST_BUCKET}/{}?{query}",
        uuid::Uuid::new_v4().simple()
    );
    let client = S3BlobConfig::from_uri(&uri)
        .expect("a well-formed test URI")
        .client();
    if let Err(err) = client.create_bucket().bucket(TEST_BUCKET).send().await {
        let exists = err
            .as_service_error()
            .is_some_and(|e| e.is_bucket_already_owned_by_you() || e.is_bucket_already_exists());
        assert!(
            exists,
            "cannot create the test bucket at {endpoint}: {}",
            aws_sdk_s3::error::DisplayErrorContext(&err)
        );
    }
    Some(uri)
}
