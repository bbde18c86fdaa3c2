//! The fleet's persist queue: the Redis Stream `herald:persist`, appended by the publish
//! script and read by workers in the consumer group `persist-workers`.

use std::sync::Arc;
use std::time::Duration;

use herald_core::{BoxFuture, Entry, Namespace, PersistQueue, StoreError};
use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

use crate::RedisSettings;
use crate::codec::StoredMessage;

/// The consumer group every worker reads in.
pub const GROUP: &str = "persist-workers";

/// The persist stream's key: `herald:persist`, suffixed with the key prefix when it is not
/// the default, so fleets (and tests) sharing a Redis stay apart.
pub fn stream_key(prefix: &str) -> String {
    if prefix == "socket.io" {
        "herald:persist".to_owned()
    } else {
        format!("herald:persist:{prefix}")
    }
}

/// One worker's view of the persist stream.
///
/// ## Delivery
/// Entries are read with XREADGROUP and acknowledged (XACK, then XDEL) only after the store
/// committed them. Entries a dead worker read but never acknowledged are claimed with
/// XAUTOCLAIM once idle for `claim_idle`. The stream has no length cap: trimming it would
/// drop messages that are not stored yet.
pub struct RedisQueue {
    settings: RedisSettings,
    stream: String,
    consumer: String,
    claim_idle: Duration,
    conn: OnceCell<ConnectionManager>,
}

impl RedisQueue {
    pub fn new(settings: RedisSettings, consumer: &str, claim_idle: Duration) -> Self {
        Self {
            stream: stream_key(&settings.key),
            settings,
            consumer: consumer.to_owned(),
            claim_idle,
            conn: OnceCell::new(),
        }
    }

    /// A connection of its own: blocking reads must not stall the broker's commands.
    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let client = self.settings.client().map_err(unavailable)?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(3)))
                    .set_response_timeout(None);
                let mut conn = ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(unavailable)?;
                let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&self.stream)
                    .arg(GROUP)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async(&mut conn)
                    .await;
                match created {
                    Err(e) if e.code() != Some("BUSYGROUP") => Err(unavailable(e)),
                    _ => Ok(conn),
                }
            })
            .await?;
        Ok(conn.clone())
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis persist stream: {e}"))
}

type StreamEntries = Vec<(String, Vec<(String, String)>)>;

fn entries(raw: StreamEntries) -> Vec<Entry> {
    raw.into_iter()
        .filter_map(|(id, fields)| {
            let field = |name: &str| {
                fields
                    .iter()
                    .find(|(f, _)| f == name)
                    .map(|(_, v)| v.as_str())
            };
            let namespace = Namespace::new(field("ns").unwrap_or("/"));
            let stored: StoredMessage = serde_json::from_str(field("m")?).ok()?;
            Some(Entry {
                id,
                message: Arc::new(stored.into_message(&namespace)),
            })
        })
        .collect()
}

impl PersistQueue for RedisQueue {
    fn push(&self, _message: Arc<herald_core::Message>) -> BoxFuture<'_, Result<(), StoreError>> {
        // The broker's publish script appended it already, in the same atomic step.
        Box::pin(std::future::ready(Ok(())))
    }

    fn read(&self, max: usize, wait: Duration) -> BoxFuture<'_, Result<Vec<Entry>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let (_, claimed, _): (String, StreamEntries, Vec<String>) = redis::cmd("XAUTOCLAIM")
                .arg(&self.stream)
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(self.claim_idle.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(max)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let mut batch = entries(claimed);
            if !batch.is_empty() {
                tracing::info!(consumer = %self.consumer, claimed = batch.len(), "claimed entries of an idle worker");
                return Ok(batch);
            }
            let deadline = tokio::time::Instant::now() + wait;
            while batch.len() < max {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                let reply: Option<Vec<(String, StreamEntries)>> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(&self.consumer)
                    .arg("COUNT")
                    .arg(max - batch.len())
                    .arg("BLOCK")
                    .arg(left.as_millis().max(1) as u64)
                    .arg("STREAMS")
                    .arg(&self.stream)
                    .arg(">")
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                for (_, raw) in reply.unwrap_or_default() {
                    batch.extend(entries(raw));
                }
            }
            Ok(batch)
        })
    }

    fn ack(&self, ids: &[String]) -> BoxFuture<'_, Result<(), StoreError>> {
        let ids = ids.to_vec();
        Box::pin(async move {
            if ids.is_empty() {
                return Ok(());
            }
            let mut conn = self.conn().await?;
            redis::pipe()
                .cmd("XACK")
                .arg(&self.stream)
                .arg(GROUP)
                .arg(&ids)
                .ignore()
                .cmd("XDEL")
                .arg(&self.stream)
                .arg(&ids)
                .ignore()
                .exec_async(&mut conn)
                .await
                .map_err(unavailable)
        })
    }

    fn backlog(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            redis::cmd("XLEN")
                .arg(&self.stream)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)
        })
    }
}
