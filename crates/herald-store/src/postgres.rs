//! The PostgreSQL store: each batch is copied into a staging table with COPY, then inserted
//! with `ON CONFLICT DO NOTHING`, in one transaction.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use herald_core::{BoxFuture, HistoryQuery, Message, RoomKey, Store, StoreError};
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::{Row, sql_offset, unavailable};

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `url` and migrates the database.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
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
    for c in value.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
}

/// The batch as CSV rows for COPY: id, namespace, room, epoch, offset, sender, payload,
/// ts (ms), instance (an unquoted empty field, which COPY reads as NULL, when unknown).
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
        let _ = write!(out, ",{},", m.ts);
        if let Some(instance) = &m.instance {
            csv_field(&mut out, instance);
        }
        out.push('\n');
    }
    out
}

impl Store for PostgresStore {
    fn write(&self, batch: &[Arc<Message>]) -> BoxFuture<'_, Result<u64, StoreError>> {
        let rows = csv(batch);
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            sqlx::query(
                r#"CREATE TEMP TABLE staging (id TEXT, namespace TEXT, room TEXT, epoch TEXT,
                   "offset" BIGINT, sender TEXT, payload TEXT, ts BIGINT, instance TEXT) ON COMMIT DROP"#,
            )
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            let mut copy = tx
                .copy_in_raw(r#"COPY staging (id, namespace, room, epoch, "offset", sender, payload, ts, instance) FROM STDIN WITH (FORMAT csv)"#)
                .await
                .map_err(unavailable)?;
            copy.send(rows.as_bytes()).await.map_err(unavailable)?;
            copy.finish().await.map_err(unavailable)?;
            let written = sqlx::query(
                r#"INSERT INTO messages (id, namespace, room, epoch, "offset", sender, payload, created_at, instance)
                   SELECT id, namespace, room, epoch, "offset", sender, payload::jsonb, to_timestamp(ts / 1000.0), instance
                   FROM staging ORDER BY namespace, room, epoch, "offset"
                   ON CONFLICT DO NOTHING"#,
            )
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
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
