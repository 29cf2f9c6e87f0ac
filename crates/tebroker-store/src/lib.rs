//! The broker's durable history and inventory.
//!
//! - [`record`]: what is kept — ended leases, TE state changes, ended waits, and the plain TEs
//!   a broker keeps out of rotation (no secrets: no record has a field for TE data);
//! - [`Store`]: one trait, two implementations: [`SqliteStore`] (embedded, one file in a data
//!   directory, WAL) and [`PgStore`] (PostgreSQL, shared by several brokers); schema migrations
//!   run when a store is opened;
//! - [`StoreWriter`]: a bounded queue and a background thread that writes in batches;
//!   [`StoreWriter::record`] never blocks, and a store that is down is retried with backoff.
//!
//! The API is synchronous on purpose: the writer is a plain thread, and SQLite is synchronous
//! anyway. An async caller (the HTTP layer) runs queries with `tokio::task::spawn_blocking`;
//! a [`PgStore`] must be opened, used and dropped off the runtime's threads (the `postgres`
//! client runs a runtime of its own, which tokio refuses to block on or drop inside another).

pub mod pg;
pub mod query;
pub mod record;
mod schema;
pub mod sqlite;
pub mod writer;

use std::fmt;
use std::path::PathBuf;

pub use pg::PgStore;
pub use query::{
    BadCursor, Cursor, EnvSummary, HistoryPage, HistoryQuery, InventoryQuery, PurgeCounts,
    StoredLease, WaitEstimate, WaitQuery, DEFAULT_PAGE, MAX_PAGE,
};
pub use record::{
    now_ms, EnvState, EnvStateChange, LeaseRecord, Millis, Outcome, PauseKind, PauseRecord,
    Priority, Record, Stamped, TePause, UnknownValue, WaitEnd, WaitRecord,
};
pub use schema::SCHEMA_VERSION;
pub use sqlite::SqliteStore;
pub use writer::{StoreWriter, WriterConfig, WriterStats};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgresql: {0}")]
    Postgres(#[from] postgres::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the database's schema is version {found}, newer than this tebroker knows ({known}); \
         upgrade tebroker"
    )]
    SchemaTooNew { found: u32, known: u32 },
    #[error("bad database address: {0}")]
    BadAddress(String),
}

/// The durable store. Every method is one round of work on the database; `write` is one
/// transaction and idempotent (see [`Stamped`]).
pub trait Store: Send {
    /// `sqlite PATH` or `postgresql host=... dbname=...` (never a password), for logs.
    fn describe(&self) -> String;
    /// The schema version the database is at.
    fn schema_version(&mut self) -> Result<u32, StoreError>;
    /// Writes `batch` in one transaction; records already stored (same origin and seq) are
    /// skipped, and a TE's latest state only moves to a newer `since_ms`.
    fn write(&mut self, batch: &[Stamped]) -> Result<(), StoreError>;
    /// A page of ended leases, newest first.
    fn history(&mut self, q: &HistoryQuery) -> Result<HistoryPage, StoreError>;
    /// Every TE with its latest state, sorted by name.
    fn inventory(&mut self, q: &InventoryQuery) -> Result<Vec<EnvSummary>, StoreError>;
    /// One TE of the inventory.
    fn env(&mut self, name: &str, q: &InventoryQuery) -> Result<Option<EnvSummary>, StoreError>;
    /// A TE's state changes, newest first.
    fn env_states(&mut self, name: &str, limit: u32) -> Result<Vec<EnvStateChange>, StoreError>;
    /// Ended waits, newest first.
    fn waits(&mut self, q: &WaitQuery) -> Result<Vec<WaitRecord>, StoreError>;
    /// Removes leases, state changes and waits that ended (or began, for state changes) more
    /// than `days` days before `now_ms`. TEs' latest states stay.
    fn purge_older_than(&mut self, days: u32, now_ms: Millis) -> Result<PurgeCounts, StoreError>;
    /// The plain TEs broker `broker` keeps out of rotation, by TE name (not purged: they are
    /// current state).
    fn pauses(&mut self, broker: &str) -> Result<Vec<(String, TePause)>, StoreError>;

    /// The median wait of the last `n` grants on `function`.
    fn wait_estimate(
        &mut self,
        function: &str,
        n: u32,
    ) -> Result<Option<WaitEstimate>, StoreError> {
        let waits = self.waits(&WaitQuery {
            function: Some(function.to_string()),
            since: None,
            granted_only: true,
            limit: n,
        })?;
        Ok(WaitEstimate::from_waits(&waits))
    }
}

/// Where the store lives: what `--data-dir` or `--database` name.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// `DIR/tebroker.sqlite3`.
    Sqlite { dir: PathBuf },
    /// A libpq-style address: `postgresql://user:pass@host:port/db` or `host=... dbname=...`.
    Postgres { address: String },
}

impl Database {
    /// `postgres://` / `postgresql://` addresses and `key=value` strings are PostgreSQL.
    pub fn postgres(address: &str) -> Result<Database, StoreError> {
        pg::parse_config(address)?;
        Ok(Database::Postgres {
            address: address.to_string(),
        })
    }

    /// Opens (creating and migrating as needed) the store.
    pub fn open(&self) -> Result<Box<dyn Store>, StoreError> {
        Ok(match self {
            Database::Sqlite { dir } => Box::new(SqliteStore::open_dir(dir)?),
            Database::Postgres { address } => Box::new(PgStore::connect(address)?),
        })
    }
}

/// Never shows a password.
impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite { dir } => {
                write!(f, "sqlite {}", dir.join(sqlite::FILE_NAME).display())
            }
            Database::Postgres { address } => match pg::parse_config(address) {
                Ok(c) => f.write_str(&pg::describe_config(&c)),
                Err(_) => f.write_str("postgresql (unparsable address)"),
            },
        }
    }
}

impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_prints_without_its_password() {
        for address in [
            "postgresql://tebroker:s3cret-pw@db.example:5433/history",
            "host=db.example port=5433 user=tebroker password=s3cret-pw dbname=history",
        ] {
            let db = Database::postgres(address).unwrap();
            for shown in [format!("{db}"), format!("{db:?}")] {
                assert!(!shown.contains("s3cret-pw"), "{shown}");
                assert!(
                    shown.contains("db.example") && shown.contains("history"),
                    "{shown}"
                );
            }
        }
    }

    #[test]
    fn a_bad_postgres_address_is_a_clear_error() {
        let err = Database::postgres("postgresql://h:notaport/db").unwrap_err();
        assert!(matches!(err, StoreError::BadAddress(_)), "{err}");
    }
}
