//! Where a shard's data lives.

use std::fmt;
use std::path::Path;

use url::Url;

/// The value shown in place of a secret.
const MASK: &str = "****";

/// The pair of storage locations that together hold shards: a blob store for
/// immutable parts and rollups, and a consensus log for shard state.
///
/// Both are URIs (`mem://`, `file:///dir`, `sqlite:///file.db`,
/// `postgres://user@host:port/db`, `s3://bucket/prefix?endpoint=...`). They
/// may embed credentials; [`fmt::Debug`] and [`fmt::Display`] mask them (see
/// [`redact_uri`]), so a location can be logged and put in error messages.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PersistLocation {
    /// The URI of the blob store.
    pub blob_uri: String,
    /// The URI of the consensus log.
    pub consensus_uri: String,
}

impl PersistLocation {
    /// Returns the location made of these two URIs. They are validated when
    /// opened, not here.
    pub fn new(blob_uri: impl Into<String>, consensus_uri: impl Into<String>) -> Self {
        PersistLocation {
            blob_uri: blob_uri.into(),
            consensus_uri: consensus_uri.into(),
        }
    }

    /// Returns the embedded default under `dir`: a `file://` blob store in
    /// `dir/blob` and a `sqlite://` consensus log in `dir/consensus.db`.
    ///
    /// `dir` should be absolute; a relative one is interpreted relative to the
    /// working directory of the process that opens the location.
    pub fn embedded(dir: &Path) -> Self {
        // Percent-encode the path so that any directory name round-trips.
        let url = |file: &str| match Url::from_file_path(dir.join(file)) {
            Ok(url) => url.to_string(),
            Err(()) => format!("file://{}", dir.join(file).display()),
        };
        let consensus = url("consensus.db").replacen("file://", "sqlite://", 1);
        PersistLocation::new(url("blob"), consensus)
    }

    /// Returns a location whose blob and consensus live in this process's
    /// memory only (for tests).
    pub fn new_in_mem() -> Self {
        PersistLocation::new("mem://", "mem://")
    }
}

impl fmt::Debug for PersistLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PersistLocation")
            .field("blob_uri", &redact_uri(&self.blob_uri))
            .field("consensus_uri", &redact_uri(&self.consensus_uri))
            .finish()
    }
}

impl fmt::Display for PersistLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "blob={} consensus={}",
            redact_uri(&self.blob_uri),
            redact_uri(&self.consensus_uri)
        )
    }
}

/// Whether a query parameter's name says its value is a secret.
fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "credential",
        "signature",
        "passwd",
    ]
    .iter()
    .any(|word| name.contains(word))
}

/// Returns `uri` with every secret replaced by `****`: the password of the
/// user info, and query parameters whose names mention a password, secret,
/// token, credential or signature.
///
/// A string that does not parse as a URI is masked conservatively: any user
/// info and the whole query are replaced.
pub fn redact_uri(uri: &str) -> String {
    match Url::parse(uri) {
        // A URI without an authority (`user:secret@host` parses as scheme
        // `user`) has no structure to trust: mask it like an unparsed one.
        Ok(url) if !url.cannot_be_a_base() => redact_url(url),
        _ => redact_unparsed(uri),
    }
}

fn redact_url(mut url: Url) -> String {
    if url.password().is_some() {
        // Only fails for URIs that cannot have a password, which then have none.
        let _ = url.set_password(Some(MASK));
    }
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_param(&k) {
                    MASK.to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    // `Url` percent-encodes the mask; show it as typed.
    url.to_string().replace("%2A%2A%2A%2A", MASK)
}

fn redact_unparsed(uri: &str) -> String {
    // libpq-style key-value strings: `host=h user=u password=secret`.
    if !uri.contains("://") && uri.contains('=') {
        return uri
            .split_whitespace()
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if is_secret_param(key) => format!("{key}={MASK}"),
                _ => pair.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ");
    }
    let (without_query, had_query) = match uri.split_once('?') {
        Some((head, _)) => (head, true),
        None => (uri, false),
    };
    let mut out = match without_query.split_once("://") {
        // The user info ends at the last `@`: a password may contain `/`.
        Some((scheme, rest)) => match rest.rfind('@') {
            Some(at) => format!("{scheme}://{MASK}@{}", &rest[at + 1..]),
            None => format!("{scheme}://{rest}"),
        },
        None if without_query.contains('@') => MASK.to_owned(),
        None => without_query.to_owned(),
    };
    if had_query {
        out.push('?');
        out.push_str(MASK);
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            redact_uri("postgres://alice:hunter2@db.example:5432/persist"),
            "postgres://alice:****@db.example:5432/persist"
        );
        assert_eq!(
            redact_uri("postgres://alice@localhost/db"),
            "postgres://alice@localhost/db"
        );
    }

    #[test]
    fn secret_query_parameters_are_masked() {
        let uri = "s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1\
                   &aws_secret_access_key=abc123&session_token=xyz";
        let redacted = redact_uri(uri);
        assert!(!redacted.contains("abc123"), "{redacted}");
        assert!(!redacted.contains("xyz"), "{redacted}");
        assert!(
            redacted.contains("aws_secret_access_key=****"),
            "{redacted}"
        );
        assert!(redacted.contains("region=us-east-1"), "{redacted}");
    }

    #[test]
    fn key_value_connection_strings_are_masked() {
        let redacted = redact_uri("host=db user=alice password=hunter2 dbname=persist");
        assert_eq!(redacted, "host=db user=alice password=**** dbname=persist");
        let redacted = redact_uri("postgres://u:pa/ss@host/db");
        assert!(!redacted.contains("pa/ss"), "{redacted}");
    }

    #[test]
    fn unparseable_uris_are_masked_conservatively() {
        let redacted = redact_uri("postgres://bob:pa ss@[bad/db?password=x");
        assert!(!redacted.contains("pa ss"), "{redacted}");
        assert!(!redacted.contains("password=x"), "{redacted}");
        assert_eq!(redact_uri("not a uri"), "not a uri");
        assert_eq!(redact_uri("user:secret@host"), MASK);
    }

    #[test]
    fn location_debug_and_display_mask_secrets() {
        let loc = PersistLocation::new(
            "s3://b/p?secret_key=topsecret",
            "postgres://u:topsecret@h:1/db",
        );
        let debug = format!("{loc:?}");
        let display = loc.to_string();
        for shown in [&debug, &display] {
            assert!(!shown.contains("topsecret"), "{shown}");
            assert!(shown.contains("postgres://u:****@h:1/db"), "{shown}");
        }
    }

    #[test]
    fn embedded_location_is_file_and_sqlite() {
        let loc = PersistLocation::embedded(Path::new("/data/persist"));
        assert_eq!(loc.blob_uri, "file:///data/persist/blob");
        assert_eq!(loc.consensus_uri, "sqlite:///data/persist/consensus.db");
        let odd = PersistLocation::embedded(Path::new("/data/50% off #1"));
        assert_eq!(odd.blob_uri, "file:///data/50%25%20off%20%231/blob");
        let url = Url::parse(&odd.blob_uri).unwrap();
        assert_eq!(
            url.to_file_path().unwrap(),
            Path::new("/data/50% off #1/blob")
        );
    }

    proptest! {
        #[test]
        fn a_password_never_survives_redaction(password in "[a-zA-Z0-9]{6,20}") {
            let uri = format!("postgres://user:{password}@host:5432/db");
            prop_assert!(!redact_uri(&uri).contains(&password));
            let uri = format!("s3://b/p?password={password}");
            prop_assert!(!redact_uri(&uri).contains(&password));
        }
    }
}
