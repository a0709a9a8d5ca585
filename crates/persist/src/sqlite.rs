//! A [`Consensus`] in a SQLite database file: the embedded default.
//!
//! The database runs in WAL mode with `synchronous=FULL`, so a committed
//! compare-and-set survives a crash of the process or the machine. SQLite
//! serializes writers (also across processes, through its file locks), which
//! makes each compare-and-set a short `BEGIN IMMEDIATE` transaction.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::error::{ExternalError, chain};
use crate::location::{
    CaSResult, Consensus, SeqNo, VersionedData, seqno_from_i64, seqno_to_i64, truncate_past_head,
    validate_cas,
};

/// How long a statement waits for another process's write lock before
/// failing (determinately) with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS consensus (
    shard TEXT NOT NULL,
    seqno INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (shard, seqno)
) WITHOUT ROWID";

/// A [`Consensus`] stored in one SQLite database file.
#[derive(Clone, Debug)]
pub struct SqliteConsensus {
    path: Arc<PathBuf>,
    conn: Arc<Mutex<Connection>>,
}

impl SqliteConsensus {
    /// Opens (creating if needed) the database at `path` and its parent
    /// directory, and creates the schema.
    ///
    /// Fails with a determinate error naming the file if it exists but is not
    /// a SQLite database; such a file is left untouched.
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self, ExternalError> {
        let path = path.into();
        let opened = path.clone();
        let conn = tokio::task::spawn_blocking(move || open_connection(&opened))
            .await
            .map_err(|e| ExternalError::determinate(format!("sqlite open task failed: {e}")))??;
        Ok(SqliteConsensus {
            path: Arc::new(path),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on the connection, off the async runtime's worker threads.
    async fn with_conn<T: Send + 'static>(
        &self,
        what: &'static str,
        work: impl FnOnce(&mut Connection) -> Result<T, ExternalError> + Send + 'static,
    ) -> Result<T, ExternalError> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || work(&mut lock(&conn)))
            .await
            .map_err(|e| ExternalError::indeterminate(format!("sqlite {what} task failed: {e}")))?
    }
}

fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A panic while holding the lock leaves SQLite itself consistent: any
    // open transaction is rolled back when the next one begins.
    conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn open_connection(path: &Path) -> Result<Connection, ExternalError> {
    let context = format!("open sqlite database {}", path.display());
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| ExternalError::determinate(chain(&context, &e)))?;
    }
    let conn = Connection::open(path).map_err(|e| sql_error(&context, e))?;
    // Before anything that locks: other processes may be opening it too.
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| sql_error(&context, e))?;
    // Switching to WAL and creating the schema upgrade a shared lock to an
    // exclusive one. When several processes do that at once SQLite answers
    // one of them "busy" at once, without waiting (to avoid a deadlock), so
    // the setup is retried until the busy timeout.
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        match set_up(&conn, &context) {
            Err(SetupError::Busy(err)) if std::time::Instant::now() < deadline => {
                tracing::debug!(%context, %err, "sqlite busy during setup; retrying");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(SetupError::Busy(err)) => return Err(sql_error(&context, err)),
            Err(SetupError::Other(err)) => return Err(err),
            Ok(()) => return Ok(conn),
        }
    }
}

enum SetupError {
    /// Another connection held a conflicting lock: worth retrying.
    Busy(rusqlite::Error),
    Other(ExternalError),
}

fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Enables WAL and full syncs and creates the schema; each step is
/// idempotent, so a busy step can be retried from the start.
fn set_up(conn: &Connection, context: &str) -> Result<(), SetupError> {
    let fail = |err: rusqlite::Error| {
        if is_busy(&err) {
            SetupError::Busy(err)
        } else {
            SetupError::Other(sql_error(context, err))
        }
    };
    // The first statement reads the header: a file that is not a database is
    // rejected here, before anything writes to it.
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(fail)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(SetupError::Other(ExternalError::determinate(format!(
            "{context}: could not enable WAL mode (journal mode is {mode})"
        ))));
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(fail)?;
    // Taking the write lock first makes concurrent creators queue on the
    // busy timeout instead of failing a lock upgrade.
    conn.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA}; COMMIT;"))
        .map_err(|err| {
            // Leave no transaction open behind a failed batch.
            let _ = conn.execute_batch("ROLLBACK");
            fail(err)
        })
}

/// An error before commit: the transaction did not take effect.
fn sql_error(context: &str, err: rusqlite::Error) -> ExternalError {
    ExternalError::determinate(chain(context, &err))
}

/// An error from `COMMIT`. A lock conflict means nothing was written; any
/// other failure (I/O, disk full) may come after the commit record reached
/// the WAL, which recovery would replay, so the outcome is unknown.
fn commit_error(context: &str, err: rusqlite::Error) -> ExternalError {
    if is_busy(&err) {
        ExternalError::determinate(chain(context, &err))
    } else {
        ExternalError::indeterminate(chain(context, &err))
    }
}

fn read_entry(key: &str, row: &rusqlite::Row<'_>) -> Result<VersionedData, ExternalError> {
    let seqno: i64 = row
        .get(0)
        .map_err(|e| sql_error(&format!("read consensus entry of {key}"), e))?;
    let data: Vec<u8> = row
        .get(1)
        .map_err(|e| sql_error(&format!("read consensus entry of {key}"), e))?;
    Ok(VersionedData {
        seqno: seqno_from_i64(key, seqno)?,
        data: Bytes::from(data),
    })
}

fn head_of(conn: &Connection, key: &str) -> Result<Option<VersionedData>, ExternalError> {
    let context = format!("read head of {key}");
    let mut stmt = conn
        .prepare_cached(
            "SELECT seqno, data FROM consensus WHERE shard = ?1 ORDER BY seqno DESC LIMIT 1",
        )
        .map_err(|e| sql_error(&context, e))?;
    let mut rows = stmt
        .query(params![key])
        .map_err(|e| sql_error(&context, e))?;
    match rows.next().map_err(|e| sql_error(&context, e))? {
        Some(row) => read_entry(key, row).map(Some),
        None => Ok(None),
    }
}

#[async_trait]
impl Consensus for SqliteConsensus {
    async fn head(&self, key: &str) -> Result<Option<VersionedData>, ExternalError> {
        let key = key.to_owned();
        self.with_conn("head", move |conn| head_of(conn, &key))
            .await
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<SeqNo>,
        new: VersionedData,
    ) -> Result<CaSResult, ExternalError> {
        validate_cas(expected, &new)?;
        let key = key.to_owned();
        self.with_conn("compare_and_set", move |conn| {
            let context = format!("compare_and_set {key}");
            let txn = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| sql_error(&context, e))?;
            let head: Option<i64> = txn
                .prepare_cached("SELECT max(seqno) FROM consensus WHERE shard = ?1")
                .and_then(|mut stmt| stmt.query_row(params![key], |row| row.get(0)))
                .map_err(|e| sql_error(&context, e))?;
            let head = head.map(|h| seqno_from_i64(&key, h)).transpose()?;
            if head != expected {
                let current = head_of(&txn, &key)?;
                return Ok(CaSResult::ExpectationMismatch(current));
            }
            txn.prepare_cached("INSERT INTO consensus (shard, seqno, data) VALUES (?1, ?2, ?3)")
                .and_then(|mut stmt| {
                    stmt.execute(params![key, seqno_to_i64(new.seqno), &new.data[..]])
                })
                .map_err(|e| sql_error(&context, e))?;
            txn.commit().map_err(|e| commit_error(&context, e))?;
            Ok(CaSResult::Committed)
        })
        .await
    }

    async fn scan(
        &self,
        key: &str,
        from: SeqNo,
        limit: usize,
    ) -> Result<Vec<VersionedData>, ExternalError> {
        let key = key.to_owned();
        self.with_conn("scan", move |conn| {
            let context = format!("scan {key}");
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seqno, data FROM consensus WHERE shard = ?1 AND seqno >= ?2 \
                     ORDER BY seqno ASC LIMIT ?3",
                )
                .map_err(|e| sql_error(&context, e))?;
            let mut rows = stmt
                .query(params![key, seqno_to_i64(from.min(SeqNo::MAX)), limit])
                .map_err(|e| sql_error(&context, e))?;
            let mut entries = Vec::new();
            while let Some(row) = rows.next().map_err(|e| sql_error(&context, e))? {
                entries.push(read_entry(&key, row)?);
            }
            Ok(entries)
        })
        .await
    }

    async fn truncate(&self, key: &str, seqno: SeqNo) -> Result<usize, ExternalError> {
        let key = key.to_owned();
        self.with_conn("truncate", move |conn| {
            let context = format!("truncate {key}");
            let txn = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| sql_error(&context, e))?;
            let head: Option<i64> = txn
                .query_row(
                    "SELECT max(seqno) FROM consensus WHERE shard = ?1",
                    params![key],
                    |row| row.get(0),
                )
                .optional()
                .map_err(|e| sql_error(&context, e))?
                .flatten();
            let head = head.map(|h| seqno_from_i64(&key, h)).transpose()?;
            if head.is_none_or(|head| seqno > head) {
                return Err(truncate_past_head(&key, seqno, head));
            }
            let deleted = txn
                .execute(
                    "DELETE FROM consensus WHERE shard = ?1 AND seqno < ?2",
                    params![key, seqno_to_i64(seqno)],
                )
                .map_err(|e| sql_error(&context, e))?;
            txn.commit().map_err(|e| commit_error(&context, e))?;
            Ok(deleted)
        })
        .await
    }

    async fn list_keys(&self) -> Result<Vec<String>, ExternalError> {
        self.with_conn("list_keys", |conn| {
            let context = "list consensus keys";
            let mut stmt = conn
                .prepare_cached("SELECT DISTINCT shard FROM consensus ORDER BY shard")
                .map_err(|e| sql_error(context, e))?;
            let keys = stmt
                .query_map([], |row| row.get::<_, String>(0))
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(|e| sql_error(context, e))?;
            Ok(keys)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::conformance::consensus_conformance_tests!(async {
        let dir = tempfile::tempdir().unwrap().keep();
        let consensus = SqliteConsensus::open(dir.join("consensus.db"))
            .await
            .unwrap();
        Some(Arc::new(consensus) as Arc<dyn Consensus>)
    });

    #[tokio::test]
    async fn durable_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("sqlite://{}/nested/consensus.db", dir.path().display());
        crate::conformance::consensus_durable_across_reopen(&uri).await;
    }

    #[tokio::test]
    async fn corrupted_database_file_is_rejected_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consensus.db");
        let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &garbage).unwrap();

        let err = SqliteConsensus::open(&path).await.unwrap_err();
        assert!(err.is_determinate());
        let message = err.to_string();
        assert!(message.contains("consensus.db"), "{message}");
        assert!(message.contains("not a database"), "{message}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            garbage,
            "the file must be left as it was"
        );
        assert!(!dir.path().join("consensus.db-wal").exists());
    }

    #[tokio::test]
    async fn corrupt_rows_are_reported_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consensus.db");
        let consensus = SqliteConsensus::open(&path).await.unwrap();
        // Something other than this code wrote a row no writer could have.
        let raw = Connection::open(&path).unwrap();
        raw.execute("INSERT INTO consensus VALUES ('k', -5, x'00')", [])
            .unwrap();
        let err = consensus.head("k").await.unwrap_err();
        assert!(err.to_string().contains("negative seqno -5"), "{err}");
        raw.execute(
            "INSERT INTO consensus VALUES ('j', 1, 'text, not bytes')",
            [],
        )
        .unwrap();
        let err = consensus.head("j").await.unwrap_err();
        assert!(
            err.to_string().contains("read consensus entry of j"),
            "{err}"
        );
        raw.execute("INSERT INTO consensus VALUES ('i', 1, 3.5)", [])
            .unwrap();
        let err = consensus.head("i").await.unwrap_err();
        assert!(
            err.to_string().contains("read consensus entry of i"),
            "{err}"
        );
    }
}
