//! herald's durable path: the stores messages end up in, the in-process persist queue, and
//! the batching worker between them.
//!
//! # Layout
//!
//! - [`sqlite`]: the embedded default, one file under the data directory.
//! - [`postgres`]: PostgreSQL, one COPY per batch (through a staging table when a batch
//!   holds rows already stored).
//! - [`queue`]: the bounded in-process persist queue of single-instance mode, and the fleet's
//!   queue that keeps beside the Redis stream what an instance accepted while Redis was away.
//! - [`worker`]: reads the queue in batches, writes the store, acknowledges after commit.
//!
//! Migrations are versioned SQL files under `migrations/<engine>/`, applied at start and by
//! `herald migrate`.

pub mod postgres;
pub mod queue;
pub mod sqlite;
pub mod worker;

use std::path::Path;
use std::sync::Arc;

use herald_core::{Message, Namespace, RoomName, Store, StoreError, UserId};

pub use postgres::PostgresStore;
pub use queue::{FleetQueue, MemoryQueue};
pub use sqlite::SqliteStore;
pub use worker::{Worker, WorkerSettings};

/// Opens (and migrates) the store a URL names: `postgres://…` or `postgresql://…` for
/// PostgreSQL, `sqlite:…` for SQLite; without one, SQLite at `data_dir/herald.db`.
pub async fn open(url: Option<&str>, data_dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
    match url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Arc::new(PostgresStore::connect(url).await?))
        }
        Some(url) if url.starts_with("sqlite:") => Ok(Arc::new(SqliteStore::connect(url).await?)),
        Some(other) => Err(StoreError::Unavailable(format!(
            "unsupported database url scheme in {:?}; expected postgres:// or sqlite:",
            other.split("://").next().unwrap_or(other)
        ))),
        None => {
            std::fs::create_dir_all(data_dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", data_dir.display()))
            })?;
            let url = format!("sqlite://{}?mode=rwc", data_dir.join("herald.db").display());
            Ok(Arc::new(SqliteStore::connect(&url).await?))
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A stored row back as a message. Both stores select these columns by name, with the
/// time as unix milliseconds in `ts`.
#[derive(sqlx::FromRow)]
struct Row {
    namespace: String,
    id: String,
    room: String,
    epoch: String,
    offset: i64,
    sender: String,
    payload: String,
    ts: i64,
    instance: Option<String>,
}

impl Row {
    /// The rows that still make valid messages (a room renamed past today's rules is skipped).
    fn messages(rows: Vec<Row>) -> Vec<Arc<Message>> {
        rows.into_iter().filter_map(Row::into_message).collect()
    }

    fn into_message(self) -> Option<Arc<Message>> {
        Some(Arc::new(Message {
            namespace: Namespace::new(&self.namespace),
            room: RoomName::new(&self.room).ok()?,
            id: self.id,
            offset: u64::try_from(self.offset).ok()?,
            from: UserId::new(self.sender),
            data: serde_json::value::RawValue::from_string(self.payload).ok()?,
            ts: self.ts,
            epoch: self.epoch.into(),
            instance: self.instance.map(Into::into),
        }))
    }
}

/// An offset as the databases' signed 64-bit integer.
fn sql_offset(offset: u64) -> i64 {
    i64::try_from(offset).unwrap_or(i64::MAX)
}

/// Test databases: a fresh SQLite file, and a fresh PostgreSQL database on `DATABASE_URL` or
/// on a private server started from the binaries on PATH.
#[cfg(any(test, feature = "testing"))]
pub mod testing;
