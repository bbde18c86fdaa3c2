//! The SQLite store: the embedded default, one transaction per batch.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use herald_core::{BoxFuture, HistoryQuery, Message, RoomKey, Store, StoreError};
use sqlx::QueryBuilder;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::{Row, sql_offset, unavailable};

/// Rows per INSERT statement, under SQLite's bound-parameter limit.
const ROWS_PER_STATEMENT: usize = 500;

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens the database at `url` (`sqlite://path?mode=rwc`) in WAL mode and migrates it.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(unavailable)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .map_err(unavailable)?;
        Ok(Self { pool })
    }
}

impl Store for SqliteStore {
    fn write(&self, batch: &[Arc<Message>]) -> BoxFuture<'_, Result<u64, StoreError>> {
        let batch = batch.to_vec();
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            let mut written = 0;
            for chunk in batch.chunks(ROWS_PER_STATEMENT) {
                let mut insert = QueryBuilder::new(
                    r#"INSERT OR IGNORE INTO messages (id, namespace, room, "offset", sender, payload, created_at) "#,
                );
                insert.push_values(chunk, |mut row, m| {
                    row.push_bind(m.id.as_str())
                        .push_bind(m.namespace.as_str())
                        .push_bind(m.room.as_str())
                        .push_bind(sql_offset(m.offset))
                        .push_bind(m.from.as_str())
                        .push_bind(m.data.get())
                        .push_bind(m.ts);
                });
                written += insert
                    .build()
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?
                    .rows_affected();
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(written)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn history(
        &self,
        key: &RoomKey,
        query: HistoryQuery,
    ) -> BoxFuture<'_, Result<Vec<Arc<Message>>, StoreError>> {
        let key = key.clone();
        Box::pin(async move {
            let before = query.before.map_or(i64::MAX, sql_offset);
            let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
            let columns = r#"SELECT namespace, id, room, "offset", sender, payload, created_at AS ts FROM messages"#;
            let rows = match query.since {
                Some(since) => {
                    sqlx::query_as::<_, Row>(&format!(
                        r#"{columns} WHERE namespace = ? AND room = ? AND "offset" > ? AND "offset" < ? ORDER BY "offset" LIMIT ?"#
                    ))
                    .bind(key.namespace.as_str())
                    .bind(key.room.as_str())
                    .bind(sql_offset(since))
                    .bind(before)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
                }
                None => {
                    sqlx::query_as::<_, Row>(&format!(
                        r#"SELECT * FROM ({columns} WHERE namespace = ? AND room = ? AND "offset" < ? ORDER BY "offset" DESC LIMIT ?) ORDER BY "offset""#
                    ))
                    .bind(key.namespace.as_str())
                    .bind(key.room.as_str())
                    .bind(before)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
                }
            }
            .map_err(unavailable)?;
            Ok(Row::messages(rows))
        })
    }
}
