//! The fleet's persist queue: the Redis Stream `herald:persist`, appended by the publish
//! script and read by workers in the consumer group `persist-workers`.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_core::{BoxFuture, Entry, Message, Namespace, PersistQueue, StoreError};
use redis::aio::ConnectionManager;

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
/// ## Entries
/// The publish script appends one message per entry; the batch script packs consecutive
/// messages into one entry (see [`entries`]). Reads hand out messages, each carrying its
/// entry's id, and ask for about as many entries as make `max` messages.
///
/// ## Delivery
/// Entries are read with XREADGROUP and acknowledged (XACK, then XDEL) only after the store
/// committed them. Entries a dead worker read but never acknowledged are claimed with
/// XAUTOCLAIM once idle for `claim_idle`. The stream has no length cap: trimming it would
/// drop messages that are not stored yet.
///
/// ## Dead connections
/// A blocking read has no response timeout of its own, so every call is bounded by its
/// blocking time plus [`REPLY_GRACE`]: a connection that never answers (half-open, or behind
/// a stuck proxy) is dropped and the next call connects afresh, rather than the worker
/// waiting forever.
pub struct RedisQueue {
    settings: RedisSettings,
    stream: String,
    consumer: String,
    claim_idle: Duration,
    conn: Mutex<Option<ConnectionManager>>,
    /// When this worker last looked for entries to claim; see [`RedisQueue::claim_due`].
    claimed_at: Mutex<Option<std::time::Instant>>,
    /// Messages per stream entry in the last read, rounded up; see [`RedisQueue::count_for`].
    per_entry: AtomicUsize,
}

/// How long a reply may take beyond a call's own blocking time before the connection is
/// presumed dead and replaced.
pub const REPLY_GRACE: Duration = Duration::from_secs(10);

impl RedisQueue {
    pub fn new(settings: RedisSettings, consumer: &str, claim_idle: Duration) -> Self {
        Self {
            stream: stream_key(&settings.key),
            settings,
            consumer: consumer.to_owned(),
            claim_idle,
            conn: Mutex::new(None),
            claimed_at: Mutex::new(None),
            per_entry: AtomicUsize::new(1),
        }
    }

    /// How many stream entries to ask for to get about `messages` messages. An entry of the
    /// batch script holds many, so asking for `BATCH_SIZE` entries would make batches many
    /// times the configured size; the last read's ratio sizes the next.
    fn count_for(&self, messages: usize) -> usize {
        messages
            .div_ceil(self.per_entry.load(Ordering::Relaxed).max(1))
            .max(1)
    }

    /// The messages of `raw`, noting how many each entry held for [`RedisQueue::count_for`].
    fn parse(&self, raw: StreamEntries) -> Vec<Entry> {
        let read = raw.len();
        let parsed = entries(raw);
        if read > 0 {
            self.per_entry
                .store(parsed.len().div_ceil(read).max(1), Ordering::Relaxed);
        }
        parsed
    }

    /// Whether to look for a dead worker's entries on this read. Entries become claimable
    /// only after `claim_idle`, so looking every quarter of it (at most once a second) finds
    /// them soon enough, without an XAUTOCLAIM scan of the pending list on every batch.
    fn claim_due(&self) -> bool {
        let every = (self.claim_idle / 4).min(Duration::from_secs(1));
        let mut at = self.claimed_at.lock().unwrap_or_else(|e| e.into_inner());
        let due = at.is_none_or(|t| t.elapsed() >= every);
        if due {
            *at = Some(std::time::Instant::now());
        }
        due
    }

    /// A connection of its own: blocking reads must not stall the broker's commands.
    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        if let Some(conn) = &*self.conn.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(conn.clone());
        }
        let client = self.settings.client().map_err(unavailable)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(None);
        let mut conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(unavailable)?;
        self.answer(Duration::ZERO, self.create_group(&mut conn))
            .await??;
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// Awaits one call, for at most `blocking` plus [`REPLY_GRACE`]; past that the connection
    /// is dropped, so that the next call opens a new one.
    async fn answer<T>(
        &self,
        blocking: Duration,
        call: impl Future<Output = T>,
    ) -> Result<T, StoreError> {
        let limit = blocking + REPLY_GRACE;
        match tokio::time::timeout(limit, call).await {
            Ok(reply) => Ok(reply),
            Err(_) => {
                *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
                tracing::warn!(
                    ?limit,
                    "redis persist stream connection did not answer: reconnecting"
                );
                Err(unavailable(format!("no reply within {limit:?}")))
            }
        }
    }

    /// Creates the stream and its consumer group unless they exist. A group made now reads
    /// from the stream's start, so entries appended before it are not skipped.
    async fn create_group(&self, conn: &mut ConnectionManager) -> Result<(), StoreError> {
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(unavailable(e)),
            _ => Ok(()),
        }
    }

    /// Claims up to `max` entries that other consumers read and left unacknowledged for
    /// `claim_idle`.
    async fn claim(
        &self,
        conn: &mut ConnectionManager,
        max: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let claimed: redis::RedisResult<(String, StreamEntries, Vec<String>)> = self
            .answer(
                Duration::ZERO,
                redis::cmd("XAUTOCLAIM")
                    .arg(&self.stream)
                    .arg(GROUP)
                    .arg(&self.consumer)
                    .arg(self.claim_idle.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(self.count_for(max))
                    .query_async(conn),
            )
            .await?;
        match claimed {
            Ok((_, claimed, _)) => Ok(self.parse(claimed)),
            Err(e) => self.read_failed(conn, e).await,
        }
    }

    /// Turns a read error into the queue's error; a Redis that lost the group (it restarted
    /// without its data) gets it back, and the next read goes on from there.
    async fn read_failed(
        &self,
        conn: &mut ConnectionManager,
        e: redis::RedisError,
    ) -> Result<Vec<Entry>, StoreError> {
        if e.code() == Some("NOGROUP") {
            tracing::warn!(stream = %self.stream, "persist stream group missing (Redis lost its data?): creating it again");
            self.create_group(conn).await?;
            return Ok(Vec::new());
        }
        Err(unavailable(e))
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis persist stream: {e}"))
}

type StreamEntries = Vec<(String, Vec<(String, String)>)>;

/// The messages of stream entries, in order. An entry holds one message (`ns`, `m`, `ep`,
/// `in`: the publish script) or several (`ns`, `in`, then `m` and `ep` per message: the
/// batch script); each message becomes an [`Entry`] with its stream entry's id, so the
/// entry is acknowledged with the batch that holds all of its messages. A message that does
/// not parse could never be stored; it is skipped, and an entry left with none stays
/// pending, where `herald_persist_pending` shows it.
fn entries(raw: StreamEntries) -> Vec<Entry> {
    let mut out = Vec::with_capacity(raw.len());
    for (id, fields) in raw {
        let field = |name: &str| {
            fields
                .iter()
                .find(|(f, _)| f == name)
                .map(|(_, v)| v.as_str())
        };
        let namespace = Namespace::new(field("ns").unwrap_or("/"));
        let instance: Option<Arc<str>> = field("in").filter(|i| !i.is_empty()).map(Into::into);
        // One slot per `m`, so that an `ep` never lands on the message before one that
        // did not parse.
        let mut messages: Vec<Option<Message>> = Vec::new();
        for (name, value) in &fields {
            match name.as_str() {
                "m" => messages.push(
                    serde_json::from_str::<StoredMessage>(value)
                        .ok()
                        .map(|stored| stored.into_message(&namespace)),
                ),
                // Entries appended before epochs were recorded count in the empty epoch.
                "ep" => {
                    if let Some(Some(message)) = messages.last_mut() {
                        message.epoch = value.as_str().into();
                    }
                }
                _ => {}
            }
        }
        let first = out.len();
        out.extend(messages.into_iter().flatten().map(|mut message| {
            message.instance = instance.clone();
            Entry {
                id: id.clone(),
                message: Arc::new(message),
            }
        }));
        if out.len() == first {
            tracing::warn!(%id, "persist stream entry holds no message that parses");
        }
    }
    out
}

impl PersistQueue for RedisQueue {
    fn push(&self, _message: Arc<herald_core::Message>) -> BoxFuture<'_, Result<(), StoreError>> {
        // The broker's publish script appended it already, in the same atomic step.
        Box::pin(std::future::ready(Ok(())))
    }

    fn read(&self, max: usize, wait: Duration) -> BoxFuture<'_, Result<Vec<Entry>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let mut batch = Vec::new();
            if self.claim_due() {
                batch = self.claim(&mut conn, max).await?;
            }
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
                let reply: redis::RedisResult<Option<Vec<(String, StreamEntries)>>> = self
                    .answer(
                        left,
                        redis::cmd("XREADGROUP")
                            .arg("GROUP")
                            .arg(GROUP)
                            .arg(&self.consumer)
                            .arg("COUNT")
                            .arg(self.count_for(max - batch.len()))
                            .arg("BLOCK")
                            .arg(left.as_millis().max(1) as u64)
                            .arg("STREAMS")
                            .arg(&self.stream)
                            .arg(">")
                            .query_async(&mut conn),
                    )
                    .await?;
                let reply = match reply {
                    Ok(reply) => reply,
                    Err(e) if batch.is_empty() => return self.read_failed(&mut conn, e).await,
                    // Entries read already are handed over; the error comes back next read.
                    Err(_) => break,
                };
                for (_, raw) in reply.unwrap_or_default() {
                    batch.extend(self.parse(raw));
                }
            }
            Ok(batch)
        })
    }

    fn ack(&self, ids: &[String]) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut ids = ids.to_vec();
        // The messages of one entry come together, so its id repeats in a row.
        ids.dedup();
        Box::pin(async move {
            if ids.is_empty() {
                return Ok(());
            }
            let mut conn = self.conn().await?;
            let mut pipe = redis::pipe();
            pipe.cmd("XACK")
                .arg(&self.stream)
                .arg(GROUP)
                .arg(&ids)
                .ignore()
                .cmd("XDEL")
                .arg(&self.stream)
                .arg(&ids)
                .ignore();
            self.answer(Duration::ZERO, pipe.exec_async(&mut conn))
                .await?
                .map_err(unavailable)
        })
    }

    fn pending(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let summary: redis::Value = self
                .answer(
                    Duration::ZERO,
                    redis::cmd("XPENDING")
                        .arg(&self.stream)
                        .arg(GROUP)
                        .query_async(&mut conn),
                )
                .await?
                .map_err(unavailable)?;
            // The summary form: [count, smallest id, greatest id, [[consumer, count]…]].
            match summary {
                redis::Value::Array(items) => match items.first() {
                    Some(redis::Value::Int(n)) => Ok(u64::try_from(*n).unwrap_or(0)),
                    _ => Ok(0),
                },
                _ => Ok(0),
            }
        })
    }

    fn backlog(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            self.answer(
                Duration::ZERO,
                redis::cmd("XLEN").arg(&self.stream).query_async(&mut conn),
            )
            .await?
            .map_err(unavailable)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(room: &str, offset: u64) -> String {
        format!(
            r#"{{"room":"{room}","id":"m{offset}","offset":{offset},"from":"u","data":{{"n":{offset}}},"ts":5}}"#
        )
    }

    fn pairs(fields: &[(&str, String)]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|(f, v)| ((*f).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn an_entry_of_several_messages_gives_each_its_epoch_and_the_entry_id() {
        let raw = vec![
            (
                "1-0".to_owned(),
                pairs(&[
                    ("ns", "/chat".into()),
                    ("m", stored("a", 1)),
                    ("ep", "e1".into()),
                    ("in", "i1".into()),
                ]),
            ),
            (
                "2-0".to_owned(),
                pairs(&[
                    ("ns", "/chat".into()),
                    ("in", "i2".into()),
                    ("m", stored("a", 2)),
                    ("ep", "e1".into()),
                    ("m", "not json".into()),
                    ("ep", "lost".into()),
                    ("m", stored("b", 1)),
                    ("ep", "e2".into()),
                ]),
            ),
        ];
        let got: Vec<(String, String, u64, String, String, String)> = entries(raw)
            .into_iter()
            .map(|e| {
                (
                    e.id,
                    e.message.room.as_str().to_owned(),
                    e.message.offset,
                    e.message.epoch.to_string(),
                    e.message.namespace.as_str().to_owned(),
                    e.message.instance.as_deref().unwrap_or("").to_owned(),
                )
            })
            .collect();
        let row = |id: &str, room: &str, offset, epoch: &str, instance: &str| {
            (
                id.to_owned(),
                room.to_owned(),
                offset,
                epoch.to_owned(),
                "/chat".to_owned(),
                instance.to_owned(),
            )
        };
        assert_eq!(
            got,
            vec![
                row("1-0", "a", 1, "e1", "i1"),
                row("2-0", "a", 2, "e1", "i2"),
                row("2-0", "b", 1, "e2", "i2"),
            ]
        );
    }

    #[test]
    fn an_entry_without_an_epoch_counts_in_the_empty_one() {
        let raw = vec![("1-0".to_owned(), pairs(&[("m", stored("a", 7))]))];
        let got = entries(raw);
        assert_eq!(got.len(), 1);
        assert_eq!(&*got[0].message.epoch, "");
        assert_eq!(got[0].message.namespace.as_str(), "/");
    }
}
