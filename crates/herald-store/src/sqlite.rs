//! The SQLite store: the embedded default, one transaction per batch.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use herald_core::{BoxFuture, HistoryQuery, Message, RoomKey, Store, StoreError};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder};

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

/// Writes a batch in one transaction; returns how many rows were new.
async fn write_batch(conn: &mut SqliteConnection, batch: &[Arc<Message>]) -> sqlx::Result<u64> {
    let mut tx = conn.begin().await?;
    let mut written = 0;
    for chunk in batch.chunks(ROWS_PER_STATEMENT) {
        let mut insert = QueryBuilder::new(
            r#"INSERT OR IGNORE INTO messages (id, namespace, room, epoch, "offset", sender, payload, created_at, instance) "#,
        );
        insert.push_values(chunk, |mut row, m| {
            row.push_bind(m.id.as_str())
                .push_bind(m.namespace.as_str())
                .push_bind(m.room.as_str())
                .push_bind(&*m.epoch)
                .push_bind(sql_offset(m.offset))
                .push_bind(m.from.as_str())
                .push_bind(m.data.get())
                .push_bind(m.ts)
                .push_bind(m.instance.as_deref());
        });
        written += insert.build().execute(&mut *tx).await?.rows_affected();
    }
    tx.commit().await?;
    Ok(written)
}

impl Store for SqliteStore {
    fn write(&self, batch: &[Arc<Message>]) -> BoxFuture<'_, Result<u64, StoreError>> {
        let batch = batch.to_vec();
        Box::pin(async move {
            let mut conn = self.pool.acquire().await.map_err(unavailable)?;
            let result = write_batch(&mut conn, &batch).await;
            if result.is_err() {
                // A connection that failed to write (a read-only file, a full disk) is not
                // reused: the next attempt opens the file afresh, and so sees it writable
                // again once it is.
                conn.close_on_drop();
            }
            result.map_err(unavailable)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            // A write that changes nothing: it still needs the write lock, so a read-only
            // file (or one opened with mode=ro) fails here, not only when messages arrive.
            sqlx::query("DELETE FROM messages WHERE 0")
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn history(
        &self,
        key: &RoomKey,
        epoch: &str,
        query: HistoryQuery,
    ) -> BoxFuture<'_, Result<Vec<Arc<Message>>, StoreError>> {
        let key = key.clone();
        let epoch = epoch.to_owned();
        Box::pin(async move {
            let before = query.before.map_or(i64::MAX, sql_offset);
            let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
            let columns = r#"SELECT namespace, id, room, epoch, "offset", sender, payload, created_at AS ts, instance FROM messages"#;
            let rows = match query.since {
                Some(since) => {
                    sqlx::query_as::<_, Row>(&format!(
                        r#"{columns} WHERE namespace = ? AND room = ? AND epoch = ? AND "offset" > ? AND "offset" < ? ORDER BY "offset" LIMIT ?"#
                    ))
                    .bind(key.namespace.as_str())
                    .bind(key.room.as_str())
                    .bind(&epoch)
                    .bind(sql_offset(since))
                    .bind(before)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
                }
                None => {
                    sqlx::query_as::<_, Row>(&format!(
                        r#"SELECT * FROM ({columns} WHERE namespace = ? AND room = ? AND epoch = ? AND "offset" < ? ORDER BY "offset" DESC LIMIT ?) ORDER BY "offset""#
                    ))
                    .bind(key.namespace.as_str())
                    .bind(key.room.as_str())
                    .bind(&epoch)
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
