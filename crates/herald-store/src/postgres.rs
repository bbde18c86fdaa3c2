//! The PostgreSQL store. Each batch is one COPY straight into `messages`, which commits on
//! its own; a batch that meets a row already stored (a re-delivered queue entry) is instead
//! copied into a staging table and inserted with `ON CONFLICT DO NOTHING`, in one transaction.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use herald_core::{BoxFuture, HistoryQuery, Message, RoomKey, Store, StoreError};
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::{Row, sql_offset, unavailable};

/// Connections to PostgreSQL: the worker's concurrent batches, plus one.
const POOL_SIZE: usize = 4;

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `url` and migrates the database.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE as u32)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(unavailable)?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(unavailable)?;
        Ok(Self { pool })
    }
}

/// Appends `value` as one CSV field.
fn csv_field(out: &mut String, value: &str) {
    out.push('"');
    let mut rest = value;
    while let Some(quote) = rest.find('"') {
        out.push_str(&rest[..=quote]);
        out.push('"');
        rest = &rest[quote + 1..];
    }
    out.push_str(rest);
    out.push('"');
}

/// The columns of [`csv`]'s rows, in order.
const COLUMNS: &str =
    r#"id, namespace, room, epoch, "offset", sender, payload, created_at, instance"#;

/// The latest time RFC 3339 can write (9999-12-31T23:59:59.999Z), in ms since the epoch.
const MAX_TS: i64 = 253_402_300_799_999;

/// The batch as CSV rows for COPY, in [`COLUMNS`]' order: `created_at` is RFC 3339 in UTC,
/// and `instance` is an unquoted empty field, which COPY reads as NULL, when unknown.
fn csv(batch: &[Arc<Message>]) -> String {
    let mut out = String::with_capacity(batch.len() * 192);
    for m in batch {
        for field in [
            m.id.as_str(),
            m.namespace.as_str(),
            m.room.as_str(),
            &m.epoch,
        ] {
            csv_field(&mut out, field);
            out.push(',');
        }
        let _ = write!(out, "{},", m.offset);
        csv_field(&mut out, m.from.as_str());
        out.push(',');
        csv_field(&mut out, m.data.get());
        let at = std::time::UNIX_EPOCH + Duration::from_millis(m.ts.clamp(0, MAX_TS) as u64);
        let _ = write!(out, ",{},", humantime::format_rfc3339_millis(at));
        if let Some(instance) = &m.instance {
            csv_field(&mut out, instance);
        }
        out.push('\n');
    }
    out
}

impl PostgresStore {
    /// The fast path: one COPY into `messages`, atomic and committed on its own.
    async fn copy(&self, rows: &str) -> Result<u64, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let mut copy = conn
            .copy_in_raw(&format!(
                "COPY messages ({COLUMNS}) FROM STDIN WITH (FORMAT csv)"
            ))
            .await?;
        copy.send(rows.as_bytes()).await?;
        copy.finish().await
    }

    /// The path for batches holding rows that are stored already: COPY into a staging table,
    /// then insert what is new, in one transaction.
    async fn merge(&self, rows: &str) -> Result<u64, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            r#"CREATE TEMP TABLE staging (id TEXT, namespace TEXT, room TEXT, epoch TEXT,
               "offset" BIGINT, sender TEXT, payload TEXT, created_at TIMESTAMPTZ, instance TEXT)
               ON COMMIT DROP"#,
        )
        .execute(&mut *tx)
        .await?;
        let mut copy = tx
            .copy_in_raw(&format!(
                "COPY staging ({COLUMNS}) FROM STDIN WITH (FORMAT csv)"
            ))
            .await?;
        copy.send(rows.as_bytes()).await?;
        copy.finish().await?;
        let written = sqlx::query(&format!(
            r#"INSERT INTO messages ({COLUMNS})
               SELECT id, namespace, room, epoch, "offset", sender, payload::jsonb, created_at, instance
               FROM staging ORDER BY namespace, room, epoch, "offset"
               ON CONFLICT DO NOTHING"#
        ))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(written)
    }
}

/// Whether `e` is a unique violation: the batch holds a row the table has.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "23505")
}

impl Store for PostgresStore {
    fn write(&self, batch: &[Arc<Message>]) -> BoxFuture<'_, Result<u64, StoreError>> {
        let rows = csv(batch);
        Box::pin(async move {
            match self.copy(&rows).await {
                Ok(written) => Ok(written),
                Err(e) if is_unique_violation(&e) => self.merge(&rows).await.map_err(unavailable),
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn concurrent_writes(&self) -> usize {
        // One connection stays free for history reads and pings.
        POOL_SIZE - 1
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
        epoch: &str,
        query: HistoryQuery,
    ) -> BoxFuture<'_, Result<Vec<Arc<Message>>, StoreError>> {
        let key = key.clone();
        let epoch = epoch.to_owned();
        Box::pin(async move {
            let before = query.before.map_or(i64::MAX, sql_offset);
            let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
            let columns = r#"SELECT namespace, id, room, epoch, "offset", sender, payload::text AS payload,
                (extract(epoch FROM created_at) * 1000)::bigint AS ts, instance FROM messages"#;
            let rows = match query.since {
                Some(since) => {
                    sqlx::query_as::<_, Row>(&format!(
                        r#"{columns} WHERE namespace = $1 AND room = $2 AND epoch = $3 AND "offset" > $4 AND "offset" < $5 ORDER BY "offset" LIMIT $6"#
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
                        r#"SELECT * FROM ({columns} WHERE namespace = $1 AND room = $2 AND epoch = $3 AND "offset" < $4 ORDER BY "offset" DESC LIMIT $5) newest ORDER BY "offset""#
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_quotes_doubled() {
        let mut out = String::new();
        csv_field(&mut out, r#"{"a":"b,c"}"#);
        assert_eq!(out, r#""{""a"":""b,c""}""#);
    }
}
