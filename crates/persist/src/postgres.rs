//! A [`Consensus`] in PostgreSQL (or anything speaking its protocol), for
//! several processes and machines.
//!
//! Two tables: `consensus` holds every entry and `consensus_heads` the head
//! sequence number of each key. A compare-and-set is one statement that
//! bumps the head row only if it still holds the expected sequence number
//! and, in the same statement, inserts the entry. Concurrent writers of one
//! key queue on the head row's lock, and all but the first then see a
//! different head and insert nothing, so exactly one wins each expectation
//! (at PostgreSQL's default `READ COMMITTED` isolation, for any jump in
//! sequence numbers). The tables are created on first use.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use crate::cfg::OpenError;
use crate::error::{ExternalError, chain};
use crate::location::{
    CaSResult, Consensus, SeqNo, VersionedData, seqno_from_i64, seqno_to_i64, truncate_past_head,
    validate_cas,
};

/// How long to wait for a connection when the URI does not say
/// (`connect_timeout`).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest number of connections one [`PostgresConsensus`] opens.
/// More lets more compare-and-sets of different keys run at once.
pub const DEFAULT_POOL_SIZE: usize = 16;

/// An arbitrary constant naming the advisory lock that serializes schema
/// creation between processes (`CREATE TABLE IF NOT EXISTS` alone races).
const SCHEMA_LOCK: i64 = 0x7065_7273_6973_7401;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS consensus_heads (
    shard text PRIMARY KEY,
    seqno bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS consensus (
    shard text NOT NULL,
    seqno bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (shard, seqno)
);";

const CAS_FROM_EXPECTED: &str = "
WITH bumped AS (
    UPDATE consensus_heads SET seqno = $3 WHERE shard = $1 AND seqno = $2 RETURNING shard
)
INSERT INTO consensus (shard, seqno, data) SELECT shard, $3, $4 FROM bumped";

const CAS_FROM_EMPTY: &str = "
WITH created AS (
    INSERT INTO consensus_heads (shard, seqno) VALUES ($1, $2)
    ON CONFLICT (shard) DO NOTHING RETURNING shard
)
INSERT INTO consensus (shard, seqno, data) SELECT shard, $2, $3 FROM created";

const HEAD: &str = "SELECT seqno, data FROM consensus WHERE shard = $1 ORDER BY seqno DESC LIMIT 1";

const SCAN: &str = "SELECT seqno, data FROM consensus WHERE shard = $1 AND seqno >= $2 \
                    ORDER BY seqno ASC LIMIT $3";

/// Deletes below `$2` only if `$2` is not past the head, and returns the
/// head it checked against and the count, all from one snapshot (so a
/// concurrent compare-and-set cannot make a refused truncate look like a
/// successful one).
const TRUNCATE: &str = "
WITH head AS (SELECT seqno FROM consensus_heads WHERE shard = $1),
deleted AS (
    DELETE FROM consensus WHERE shard = $1 AND seqno < $2 AND $2 <= (SELECT seqno FROM head)
    RETURNING 1
)
SELECT (SELECT seqno FROM head), (SELECT count(*) FROM deleted)";

/// Byte order (the `C` collation), whatever the database's locale.
const LIST_KEYS: &str = "SELECT shard FROM consensus_heads ORDER BY shard COLLATE \"C\"";

/// A [`Consensus`] in a PostgreSQL database, over a pool of connections.
#[derive(Clone)]
pub struct PostgresConsensus {
    pool: Pool,
    /// The URI with secrets masked, for messages.
    display: String,
}

impl std::fmt::Debug for PostgresConsensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConsensus")
            .field("uri", &self.display)
            .finish_non_exhaustive()
    }
}

impl PostgresConsensus {
    /// Connects to the database named by `uri` (a libpq-style URI or
    /// key-value string), checks that it answers, and creates the schema if
    /// it does not exist.
    ///
    /// Connections are not encrypted (TLS is not supported yet).
    pub async fn open(uri: &str) -> Result<Self, OpenError> {
        let display = persist_types::redact_uri(uri);
        let invalid = |reason: String| OpenError::InvalidUri {
            uri: display.clone(),
            reason,
        };
        let mut config = tokio_postgres::Config::from_str(uri)
            .map_err(|e| invalid(chain("connection string", &e)))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        // Notice dead peers (a partitioned server) instead of waiting on
        // them forever; what was in flight then fails indeterminately.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .tcp_user_timeout(Duration::from_secs(60));
        if config.get_application_name().is_none() {
            config.application_name("persist");
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(DEFAULT_POOL_SIZE)
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        let consensus = PostgresConsensus {
            pool,
            display: display.clone(),
        };
        consensus
            .create_schema()
            .await
            .map_err(|cause| OpenError::Unavailable {
                uri: display,
                cause,
            })?;
        Ok(consensus)
    }

    async fn conn(&self) -> Result<Object, ExternalError> {
        // Nothing was sent over a connection we could not get.
        self.pool
            .get()
            .await
            .map_err(|e| ExternalError::determinate(chain("connect", &e)))
    }

    async fn create_schema(&self) -> Result<(), ExternalError> {
        let mut conn = self.conn().await?;
        let txn = conn
            .transaction()
            .await
            .map_err(|e| pg_error("create schema", e))?;
        txn.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(|e| pg_error("create schema", e))?;
        txn.batch_execute(SCHEMA)
            .await
            .map_err(|e| pg_error("create schema", e))?;
        txn.commit().await.map_err(|e| pg_error("create schema", e))
    }
}

/// SQLSTATE classes and codes after which the statement certainly did not
/// take effect: the server rejected it before or instead of committing.
/// Everything else, including shutdown, connection and "completion
/// unknown" codes (PostgreSQL's 08007, CockroachDB's 40003), may hide a
/// commit.
fn rejected_before_commit(code: &SqlState) -> bool {
    const CLASSES: [&str; 6] = [
        "22", // data exception
        "23", // integrity constraint violation
        "42", // syntax error or access rule violation
        "0A", // feature not supported
        "25", // invalid transaction state
        "28", // invalid authorization
    ];
    const CODES: [&SqlState; 4] = [
        &SqlState::T_R_SERIALIZATION_FAILURE,
        &SqlState::T_R_DEADLOCK_DETECTED,
        &SqlState::LOCK_NOT_AVAILABLE,
        &SqlState::QUERY_CANCELED,
    ];
    CLASSES.iter().any(|class| code.code().starts_with(class)) || CODES.contains(&code)
}

/// Classifies a driver error. Determinate only when the server said it
/// rejected the statement (see [`rejected_before_commit`]) or when the
/// driver failed before sending it (encoding parameters); a broken, closed
/// or timed-out connection, or any other server error, may hide a commit.
fn pg_error(context: &str, err: tokio_postgres::Error) -> ExternalError {
    let message = chain(context, &err);
    let determinate = match err.code() {
        Some(code) => rejected_before_commit(code),
        None => {
            !err.is_closed()
                && std::error::Error::source(&err).is_none_or(|source| {
                    !source.is::<std::io::Error>() && !source.to_string().contains("timed out")
                })
                && !err.to_string().contains("timed out")
        }
    };
    if determinate {
        ExternalError::determinate(message)
    } else {
        ExternalError::indeterminate(message)
    }
}

fn read_entry(key: &str, row: &tokio_postgres::Row) -> Result<VersionedData, ExternalError> {
    let context = format!("read consensus entry of {key}");
    let seqno: i64 = row.try_get(0).map_err(|e| pg_error(&context, e))?;
    let data: Vec<u8> = row.try_get(1).map_err(|e| pg_error(&context, e))?;
    Ok(VersionedData {
        seqno: seqno_from_i64(key, seqno)?,
        data: Bytes::from(data),
    })
}

#[async_trait]
impl Consensus for PostgresConsensus {
    async fn head(&self, key: &str) -> Result<Option<VersionedData>, ExternalError> {
        let context = format!("read head of {key}");
        let conn = self.conn().await?;
        let stmt = conn
            .prepare_cached(HEAD)
            .await
            .map_err(|e| pg_error(&context, e))?;
        let row = conn
            .query_opt(&stmt, &[&key])
            .await
            .map_err(|e| pg_error(&context, e))?;
        row.map(|row| read_entry(key, &row)).transpose()
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<SeqNo>,
        new: VersionedData,
    ) -> Result<CaSResult, ExternalError> {
        validate_cas(expected, &new)?;
        let context = format!("compare_and_set {key}");
        let conn = self.conn().await?;
        let new_seqno = seqno_to_i64(new.seqno);
        let data: &[u8] = &new.data;
        let inserted = match expected {
            Some(expected) => {
                let stmt = conn
                    .prepare_cached(CAS_FROM_EXPECTED)
                    .await
                    .map_err(|e| pg_error(&context, e))?;
                conn.execute(&stmt, &[&key, &seqno_to_i64(expected), &new_seqno, &data])
                    .await
            }
            None => {
                let stmt = conn
                    .prepare_cached(CAS_FROM_EMPTY)
                    .await
                    .map_err(|e| pg_error(&context, e))?;
                conn.execute(&stmt, &[&key, &new_seqno, &data]).await
            }
        }
        .map_err(|e| pg_error(&context, e))?;
        if inserted == 1 {
            return Ok(CaSResult::Committed);
        }
        drop(conn);
        Ok(CaSResult::ExpectationMismatch(self.head(key).await?))
    }

    async fn scan(
        &self,
        key: &str,
        from: SeqNo,
        limit: usize,
    ) -> Result<Vec<VersionedData>, ExternalError> {
        let context = format!("scan {key}");
        let conn = self.conn().await?;
        let stmt = conn
            .prepare_cached(SCAN)
            .await
            .map_err(|e| pg_error(&context, e))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = conn
            .query(&stmt, &[&key, &seqno_to_i64(from.min(SeqNo::MAX)), &limit])
            .await
            .map_err(|e| pg_error(&context, e))?;
        rows.iter().map(|row| read_entry(key, row)).collect()
    }

    async fn truncate(&self, key: &str, seqno: SeqNo) -> Result<usize, ExternalError> {
        let context = format!("truncate {key}");
        let conn = self.conn().await?;
        let stmt = conn
            .prepare_cached(TRUNCATE)
            .await
            .map_err(|e| pg_error(&context, e))?;
        let row = conn
            .query_one(&stmt, &[&key, &seqno_to_i64(seqno.min(SeqNo::MAX))])
            .await
            .map_err(|e| pg_error(&context, e))?;
        let head: Option<i64> = row.try_get(0).map_err(|e| pg_error(&context, e))?;
        let deleted: i64 = row.try_get(1).map_err(|e| pg_error(&context, e))?;
        let head = head.map(|h| seqno_from_i64(key, h)).transpose()?;
        if head.is_none_or(|head| seqno > head) {
            return Err(truncate_past_head(key, seqno, head));
        }
        Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
    }

    async fn list_keys(&self) -> Result<Vec<String>, ExternalError> {
        let conn = self.conn().await?;
        let stmt = conn
            .prepare_cached(LIST_KEYS)
            .await
            .map_err(|e| pg_error("list keys", e))?;
        let rows = conn
            .query(&stmt, &[])
            .await
            .map_err(|e| pg_error("list keys", e))?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(|e| pg_error("list keys", e)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testing;

    crate::conformance::consensus_conformance_tests!(async {
        let uri = testing::postgres_database().await?;
        let consensus = PostgresConsensus::open(&uri).await.unwrap();
        Some(Arc::new(consensus) as Arc<dyn Consensus>)
    });

    #[tokio::test]
    async fn durable_across_reopen() {
        let Some(uri) = testing::postgres_database().await else {
            return;
        };
        crate::conformance::consensus_durable_across_reopen(&uri).await;
    }

    #[test]
    fn only_rejections_are_determinate() {
        for code in [
            SqlState::UNIQUE_VIOLATION,
            SqlState::SYNTAX_ERROR,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::QUERY_CANCELED,
            SqlState::INVALID_PASSWORD,
        ] {
            assert!(rejected_before_commit(&code), "{code:?}");
        }
        for code in [
            "08007", "40003", "57P01", "57P02", "08006", "XX000", "58030", "53100",
        ] {
            assert!(
                !rejected_before_commit(&SqlState::from_code(code)),
                "{code}"
            );
        }
    }

    #[tokio::test]
    async fn unreachable_server_is_a_clear_error() {
        // Nothing listens on port 1 of the loopback interface.
        let err =
            PostgresConsensus::open("postgres://persist:secretpw@127.0.0.1:1/db?connect_timeout=5")
                .await
                .unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, OpenError::Unavailable { ref cause, .. } if cause.is_determinate()),
            "{message}"
        );
        assert!(message.contains("127.0.0.1:1"), "{message}");
        assert!(!message.contains("secretpw"), "{message}");
    }

    #[tokio::test]
    async fn malformed_uri_is_a_clear_error() {
        let err = PostgresConsensus::open("postgres://u:pw@host:notaport/db")
            .await
            .unwrap_err();
        assert!(matches!(err, OpenError::InvalidUri { .. }), "{err}");
        assert!(!err.to_string().contains(":pw@"), "{err}");
    }

    #[tokio::test]
    async fn corrupt_rows_are_reported_not_trusted() {
        let Some(uri) = testing::postgres_database().await else {
            return;
        };
        let consensus = PostgresConsensus::open(&uri).await.unwrap();
        let conn = consensus.conn().await.unwrap();
        conn.batch_execute(
            "INSERT INTO consensus_heads VALUES ('k', -3); INSERT INTO consensus VALUES ('k', -3, '\\x00');",
        )
        .await
        .unwrap();
        let err = consensus.head("k").await.unwrap_err();
        assert!(err.to_string().contains("negative seqno -3"), "{err}");
    }
}
