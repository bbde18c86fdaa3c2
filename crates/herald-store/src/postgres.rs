//! The PostgreSQL store. Each batch is one COPY straight into `messages`, which commits on
//! its own; a batch that meets a row already stored (a re-delivered queue entry) is instead
//! copied into a staging table and inserted with `ON CONFLICT DO NOTHING`, in one transaction.

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

/// The columns of [`copy_rows`]' rows, in order.
const COLUMNS: &str =
    r#"id, namespace, room, epoch, "offset", sender, payload, created_at, instance"#;

/// The latest `created_at` stored (9999-12-31T23:59:59.999Z), in ms since the epoch: a
/// timestamp past it (a client clock gone wrong) is stored as it, as when rows went in as
/// RFC 3339 text.
const MAX_TS: i64 = 253_402_300_799_999;

/// 2000-01-01T00:00:00Z, PostgreSQL's timestamp origin, in ms since the Unix epoch.
const PG_EPOCH_MS: i64 = 946_684_800_000;

/// The signature and empty header of COPY's binary format.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Appends one field of COPY's binary format: its length, then its bytes.
fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Appends a text field. PostgreSQL text cannot hold NUL, which would fail the whole batch
/// for good; it is stored as U+FFFD instead.
fn text_field(out: &mut Vec<u8>, value: &str, replaced: &mut usize) {
    if value.contains('\0') {
        *replaced += value.matches('\0').count();
        field(out, value.replace('\0', "\u{FFFD}").as_bytes());
    } else {
        field(out, value.as_bytes());
    }
}

/// Appends a `jsonb` field: the format's version (1), then the JSON text. `jsonb` refuses
/// `\u0000` and unpaired UTF-16 surrogates (see [`herald_core::json_bad_escapes`]); each is
/// stored as `\ufffd`, which has the same length.
fn jsonb_field(out: &mut Vec<u8>, json: &str, replaced: &mut usize) {
    let bad = herald_core::json_bad_escapes(json);
    let len = i32::try_from(json.len() + 1).unwrap_or(i32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(1);
    let mut rest = 0;
    for (at, _) in &bad {
        out.extend_from_slice(&json.as_bytes()[rest..*at]);
        out.extend_from_slice(br"\ufffd");
        rest = at + 6;
    }
    out.extend_from_slice(&json.as_bytes()[rest..]);
    *replaced += bad.len();
}

/// The batch in COPY's binary format, in [`COLUMNS`]' order, and how many characters
/// PostgreSQL cannot hold had to be replaced. Binary rows spare PostgreSQL parsing numbers and timestamps from
/// text, and herald quoting every field.
fn copy_rows(batch: &[Arc<Message>]) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(COPY_HEADER.len() + 2 + batch.len() * 256);
    let mut replaced = 0;
    out.extend_from_slice(COPY_HEADER);
    for m in batch {
        out.extend_from_slice(&9i16.to_be_bytes());
        text_field(&mut out, &m.id, &mut replaced);
        text_field(&mut out, m.namespace.as_str(), &mut replaced);
        text_field(&mut out, m.room.as_str(), &mut replaced);
        text_field(&mut out, &m.epoch, &mut replaced);
        field(&mut out, &sql_offset(m.offset).to_be_bytes());
        text_field(&mut out, m.from.as_str(), &mut replaced);
        jsonb_field(&mut out, m.data.get(), &mut replaced);
        let micros = (m.ts.clamp(0, MAX_TS) - PG_EPOCH_MS) * 1000;
        field(&mut out, &micros.to_be_bytes());
        match &m.instance {
            Some(instance) => text_field(&mut out, instance, &mut replaced),
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    (out, replaced)
}

impl PostgresStore {
    /// The fast path: one COPY into `messages`, atomic and committed on its own.
    async fn copy(&self, rows: &[u8]) -> Result<u64, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let mut copy = conn
            .copy_in_raw(&format!(
                "COPY messages ({COLUMNS}) FROM STDIN WITH (FORMAT binary)"
            ))
            .await?;
        copy.send(rows).await?;
        copy.finish().await
    }

    /// The path for batches holding rows that are stored already: COPY into a staging table,
    /// then insert what is new, in one transaction.
    async fn merge(&self, rows: &[u8]) -> Result<u64, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            r#"CREATE TEMP TABLE staging (id TEXT, namespace TEXT, room TEXT, epoch TEXT,
               "offset" BIGINT, sender TEXT, payload JSONB, created_at TIMESTAMPTZ, instance TEXT)
               ON COMMIT DROP"#,
        )
        .execute(&mut *tx)
        .await?;
        let mut copy = tx
            .copy_in_raw(&format!(
                "COPY staging ({COLUMNS}) FROM STDIN WITH (FORMAT binary)"
            ))
            .await?;
        copy.send(rows).await?;
        copy.finish().await?;
        let written = sqlx::query(&format!(
            r#"INSERT INTO messages ({COLUMNS})
               SELECT id, namespace, room, epoch, "offset", sender, payload, created_at, instance
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
        let (rows, replaced) = copy_rows(batch);
        if replaced > 0 {
            tracing::warn!(
                replaced,
                "PostgreSQL cannot store NUL characters or unpaired surrogates: stored as U+FFFD"
            );
        }
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
    fn nul_is_replaced_in_text_and_json_and_nothing_else_changes() {
        let mut out = Vec::new();
        let mut replaced = 0;
        text_field(&mut out, "a\0b", &mut replaced);
        jsonb_field(&mut out, r#"{"x":"\u0000","y":"\\u0000"}"#, &mut replaced);
        assert_eq!(replaced, 2);
        let text = "a\u{FFFD}b";
        let json = r#"{"x":"\ufffd","y":"\\u0000"}"#;
        let mut want = Vec::new();
        want.extend_from_slice(&(text.len() as i32).to_be_bytes());
        want.extend_from_slice(text.as_bytes());
        want.extend_from_slice(&(json.len() as i32 + 1).to_be_bytes());
        want.push(1);
        want.extend_from_slice(json.as_bytes());
        assert_eq!(out, want);
    }
}
