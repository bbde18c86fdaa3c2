//! The Redis broker: per-room offsets and history from one Lua step, fan-out over the
//! adapter's channels, and single-instance service while Redis is away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use herald_core::memory::MemoryBroker;
use herald_core::{
    BoxFuture, Broker, BrokerError, Delivery, HistoryPage, HistoryQuery, LocalNode, Message,
    Namespace, Payload, Position, PresenceChange, Publication, RoomKey, RoomName,
};
use redis::aio::ConnectionManager;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch};

use crate::codec::{self, Broadcast, Channels, StoredMessage};
use crate::request;
use crate::{RedisSettings, metric};

/// Assigns the next offset, appends to the room's capped history and publishes, atomically.
///
/// KEYS: offset, history stream, epoch, persist stream. ARGV: channel, wire head, wire tail,
/// json head, json tail, history size, TTL seconds, epoch for a new history, persist (1/0),
/// namespace, publishing instance, refresh the TTL (1/0). The persist stream entry carries
/// the room's epoch, so the store keys the row by it.
///
/// The room's keys get their TTL when the script creates them, and again when the caller
/// asks for it: the broker refreshes a room's TTL once per [`Inner::refresh_due`] interval
/// rather than with three EXPIREs on every message.
const PUBLISH_SCRIPT: &str = r#"
local off = redis.call('INCR', KEYS[1])
local fresh = off == 1
if fresh then
  redis.call('DEL', KEYS[2])
  redis.call('SET', KEYS[3], ARGV[8])
end
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[8]
  fresh = true
  redis.call('SET', KEYS[3], epoch)
end
-- Lua writes a number as text through printf's floating point path: once is enough.
local text = tostring(off)
local stored = ARGV[4] .. text .. ARGV[5]
-- Commands get ARGV's text as it came: a Lua number would go through printf again.
if tonumber(ARGV[6]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], text .. '-1', 'm', stored)
end
if ARGV[9] == '1' then
  redis.call('XADD', KEYS[4], '*', 'ns', ARGV[10], 'm', stored, 'ep', epoch, 'in', ARGV[11])
end
local ttl = tonumber(ARGV[7])
if ttl > 0 and (fresh or ARGV[12] == '1') then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
end
redis.call('PUBLISH', ARGV[1], ARGV[2] .. cmsgpack.pack(off) .. ARGV[3])
return {off, epoch}
"#;

/// [`PUBLISH_SCRIPT`] for several messages in turn, in one call: the HTTP API's batches.
///
/// KEYS: the persist stream, then per message its room's offset, history stream and epoch.
/// ARGV: history size, TTL seconds, epoch for a new history, most bytes of messages per
/// persist entry, then per message: channel, wire head, wire tail, json head, json tail,
/// persist (1/0), namespace, publishing instance, refresh the TTL (1/0).
/// Returns per message its offset and epoch, or -1 and the error that refused it alone.
///
/// Three steps, each message failing alone in each: offsets and history; the persist
/// stream, where consecutive messages of one namespace share an entry (`ns`, `in`, then
/// `m` and `ep` per message) up to the byte budget, so a batch costs a few XADDs rather than
/// one per message; then the PUBLISHes, in order, of the messages that got this far.
const PUBLISH_BATCH_SCRIPT: &str = r#"
local size = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local budget = tonumber(ARGV[4])
local n = (#KEYS - 1) / 3
-- Each room's epoch, once read or set: only this script changes it while it runs.
local epochs = {}
local function assign(k, a)
  local off = redis.call('INCR', KEYS[k])
  local fresh = off == 1
  if fresh then
    redis.call('DEL', KEYS[k + 1])
    redis.call('SET', KEYS[k + 2], ARGV[3])
    epochs[KEYS[k + 2]] = ARGV[3]
  end
  local epoch = epochs[KEYS[k + 2]]
  if not epoch then
    epoch = redis.call('GET', KEYS[k + 2])
    if not epoch then
      epoch = ARGV[3]
      fresh = true
      redis.call('SET', KEYS[k + 2], epoch)
    end
    epochs[KEYS[k + 2]] = epoch
  end
  -- Lua writes a number as text through printf's floating point path: once is enough.
  local text = tostring(off)
  local stored = ARGV[a + 3] .. text .. ARGV[a + 4]
  if size > 0 then
    -- ARGV's text as it came: a Lua number would go through printf again.
    redis.call('XADD', KEYS[k + 1], 'MAXLEN', '~', ARGV[1], text .. '-1', 'm', stored)
  end
  if ttl > 0 and (fresh or ARGV[a + 8] == '1') then
    redis.call('EXPIRE', KEYS[k], ttl)
    redis.call('EXPIRE', KEYS[k + 1], ttl)
    redis.call('EXPIRE', KEYS[k + 2], ttl)
  end
  return off, epoch, stored
end
local offs, epochs_of, stored_of, errs = {}, {}, {}, {}
for i = 1, n do
  local ok, res, epoch, stored = pcall(assign, 2 + 3 * (i - 1), 5 + 9 * (i - 1))
  if ok then
    offs[i], epochs_of[i], stored_of[i] = res, epoch, stored
  else
    errs[i] = type(res) == 'table' and tostring(res.err) or tostring(res)
  end
end
local fields, members, bytes = {}, {}, 0
local function flush()
  if #members == 0 then
    return
  end
  local ok, res = pcall(redis.call, 'XADD', KEYS[1], '*', unpack(fields))
  if not ok then
    local err = type(res) == 'table' and tostring(res.err) or tostring(res)
    for _, i in ipairs(members) do
      offs[i] = nil
      errs[i] = err
    end
  end
  fields, members, bytes = {}, {}, 0
end
for i = 1, n do
  local a = 5 + 9 * (i - 1)
  if offs[i] and ARGV[a + 5] == '1' then
    local stored = stored_of[i]
    if #members > 0 and (fields[2] ~= ARGV[a + 6] or fields[4] ~= ARGV[a + 7] or bytes + #stored > budget) then
      flush()
    end
    if #members == 0 then
      fields = {'ns', ARGV[a + 6], 'in', ARGV[a + 7]}
    end
    fields[#fields + 1] = 'm'
    fields[#fields + 1] = stored
    fields[#fields + 1] = 'ep'
    fields[#fields + 1] = epochs_of[i]
    members[#members + 1] = i
    bytes = bytes + #stored
  end
end
flush()
local out = {}
for i = 1, n do
  local a = 5 + 9 * (i - 1)
  if offs[i] then
    local off = offs[i]
    -- Stored and numbered already: a failed live delivery is recovered by offset.
    pcall(redis.call, 'PUBLISH', ARGV[a], ARGV[a + 1] .. cmsgpack.pack(off) .. ARGV[a + 2])
    out[#out + 1] = off
    out[#out + 1] = epochs_of[i]
  else
    out[#out + 1] = -1
    out[#out + 1] = errs[i]
  end
end
return out
"#;

/// The most bytes of stored messages one persist stream entry of the batch script carries
/// (a larger message gets an entry of its own). It bounds what a worker's read of
/// `BATCH_SIZE` entries can hold, as a single message's limit does for single entries.
const PERSIST_ENTRY_BYTES: usize = 64 * 1024;

/// The most messages one call of [`PUBLISH_BATCH_SCRIPT`] carries, so that one call keeps
/// Redis busy for a few milliseconds at most.
const MAX_SCRIPT_BATCH: usize = 128;

/// A message ready for a publish script; see [`Inner::prepare`].
struct Prepared {
    keys: [String; 3],
    channel: String,
    parts: codec::MessageParts,
    /// `"1"` when the script appends it to the persist stream.
    persist: &'static str,
    /// `"1"` when the script refreshes the TTL of the room's keys.
    refresh: &'static str,
    /// The message, with the offset and epoch the script assigns left blank.
    draft: Message,
}

impl Prepared {
    /// The published message, once the script assigned its offset and epoch.
    fn into_message(self, meters: &Meters, offset: u64, epoch: String) -> Arc<Message> {
        meters.publishes.increment(1);
        Arc::new(Message {
            offset,
            epoch: epoch.into(),
            ..self.draft
        })
    }
}

/// The keys of one room's offset, history and epoch. They share a hash tag, so a Redis
/// Cluster keeps them on one slot and the publish script can touch all three.
fn room_keys(prefix: &str, key: &RoomKey) -> [String; 3] {
    let tag = format!("herald:{{{prefix}#{}#{}}}", key.namespace, key.room);
    [
        format!("{tag}:offset"),
        format!("{tag}:history"),
        format!("{tag}:epoch"),
    ]
}

enum SubCmd {
    Subscribe(String, RoomKey, oneshot::Sender<()>),
    Unsubscribe(String, RoomKey),
}

/// A broker shared by every instance on one Redis, in the wire format of Node's
/// `@socket.io/redis-adapter`.
///
/// ## Failure
/// While Redis is unreachable (at start or later) the broker serves this instance alone
/// through an in-memory broker, under another epoch ([`RedisBroker::fallback_epoch`]), so
/// local delivery goes on. It keeps reconnecting with capped backoff; once back, it
/// resubscribes and repairs the gap of every room from history.
///
/// ## Liveness
/// A pub/sub connection can die without closing (a half-open TCP connection, a proxy that
/// stops forwarding): it would deliver nothing, forever. Every `probe_interval` the broker
/// publishes a probe on a channel only this instance subscribes to; when nothing (the probe
/// or any other message) has arrived since the previous probe, the connection is presumed
/// dead and the broker reconnects (counted in `herald_redis_pubsub_probe_failures_total`).
pub struct RedisBroker {
    inner: Arc<Inner>,
}

struct Inner {
    settings: RedisSettings,
    client: redis::Client,
    conn: RwLock<Option<ConnectionManager>>,
    connected: watch::Sender<bool>,
    script: redis::Script,
    batch_script: redis::Script,
    fallback: MemoryBroker,
    local: Arc<dyn LocalNode>,
    channels: HashMap<Namespace, Channels>,
    refs: Mutex<HashMap<RoomKey, usize>>,
    subs: mpsc::UnboundedSender<SubCmd>,
    /// When this instance last had each room's TTL refreshed; see [`Inner::refresh_due`].
    refreshed: Mutex<TtlRefreshes>,
    meters: Meters,
}

/// Handles of the metrics counted per message, looked up once rather than on every message.
struct Meters {
    publishes: metrics::Counter,
    publish_seconds: metrics::Histogram,
    receives_room: metrics::Counter,
    receives_namespace: metrics::Counter,
    latency: metrics::Histogram,
}

impl Meters {
    fn new() -> Self {
        Self {
            publishes: metrics::counter!(metric::BROKER_PUBLISHES),
            publish_seconds: metrics::histogram!(metric::BROKER_PUBLISH_SECONDS),
            receives_room: metrics::counter!(metric::BROKER_RECEIVES, "kind" => "room"),
            receives_namespace: metrics::counter!(metric::BROKER_RECEIVES, "kind" => "namespace"),
            latency: metrics::histogram!(metric::BROKER_LATENCY),
        }
    }
}

/// The rooms whose keys this instance refreshed lately, and when.
#[derive(Default)]
struct TtlRefreshes {
    at: HashMap<RoomKey, Instant>,
    /// The size past which entries older than the interval are dropped.
    prune_at: usize,
}

impl RedisBroker {
    /// Starts the broker; it connects in the background and delivers to `local`.
    pub fn start(settings: RedisSettings, local: Arc<dyn LocalNode>) -> Result<Self, BrokerError> {
        let client = settings
            .client()
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        let channels = settings
            .namespaces
            .iter()
            .map(|n| (n.clone(), Channels::new(&settings.key, n)))
            .collect();
        let (subs, sub_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            fallback: MemoryBroker::new(settings.history_size, local.clone()),
            settings,
            client,
            conn: RwLock::new(None),
            connected: watch::Sender::new(false),
            script: redis::Script::new(PUBLISH_SCRIPT),
            batch_script: redis::Script::new(PUBLISH_BATCH_SCRIPT),
            local,
            channels,
            refs: Mutex::new(HashMap::new()),
            subs,
            refreshed: Mutex::new(TtlRefreshes::default()),
            meters: Meters::new(),
        });
        tokio::spawn(link(Arc::downgrade(&inner), sub_rx));
        Ok(Self { inner })
    }

    /// The command connection, while Redis is connected.
    pub(crate) fn command_connection(&self) -> Option<ConnectionManager> {
        self.inner.conn()
    }

    /// The epoch of the messages this broker accepts alone while Redis is away. They are
    /// not in the fleet's persist stream; the publisher queues them for the store itself.
    pub fn fallback_epoch(&self) -> Arc<str> {
        self.inner.fallback.epoch()
    }

    /// Whether Redis is connected; false while the broker serves this instance alone.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.inner.connected.subscribe()
    }
}

impl Inner {
    fn conn(&self) -> Option<ConnectionManager> {
        if !*self.connected.borrow() {
            return None;
        }
        self.conn.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn channels(&self, namespace: &Namespace) -> Result<&Channels, BrokerError> {
        self.channels.get(namespace).ok_or_else(|| {
            BrokerError::Unavailable(format!("namespace {namespace} is not configured"))
        })
    }

    /// Whether a publish to `key` should refresh the TTL of the room's keys: when this
    /// instance has not done so for a tenth of the TTL (at most a minute). Keys therefore
    /// expire between TTL minus that interval and TTL after a room's last publish, and a
    /// busy room costs three EXPIREs a minute instead of three per message. Keys the script
    /// creates get their TTL at once whatever this says.
    fn refresh_due(&self, key: &RoomKey) -> bool {
        let ttl = self.settings.history_ttl;
        if ttl.is_zero() {
            return false;
        }
        let every = (ttl / 10).min(Duration::from_secs(60));
        let now = Instant::now();
        let mut refreshed = self.refreshed.lock().unwrap_or_else(|e| e.into_inner());
        if refreshed
            .at
            .get(key)
            .is_some_and(|at| now.duration_since(*at) < every)
        {
            return false;
        }
        if refreshed.at.len() >= refreshed.prune_at {
            refreshed.at.retain(|_, at| now.duration_since(*at) < every);
            refreshed.prune_at = (refreshed.at.len() * 2).max(1024);
        }
        refreshed.at.insert(key.clone(), now);
        true
    }

    /// Makes a publication ready for a publish script: its room's keys and channel, and the
    /// message encoded around the offset the script fills in.
    fn prepare(&self, publication: Publication) -> Result<Prepared, BrokerError> {
        let channel = self
            .channels(&publication.key.namespace)?
            .room(&publication.key.room);
        let keys = room_keys(&self.settings.key, &publication.key);
        let persist = publication.persist;
        let refresh = self.refresh_due(&publication.key);
        let draft = publication.at(0, "".into());
        let parts = codec::message_parts(&self.settings.uid, &draft)
            .map_err(|e| BrokerError::Unavailable(format!("cannot encode message: {e}")))?;
        Ok(Prepared {
            keys,
            channel,
            parts,
            persist: if persist { "1" } else { "0" },
            refresh: if refresh { "1" } else { "0" },
            draft,
        })
    }

    async fn publish(
        &self,
        mut conn: ConnectionManager,
        publication: Publication,
    ) -> Result<Arc<Message>, BrokerError> {
        let p = self.prepare(publication)?;
        let started = Instant::now();
        let (offset, epoch): (u64, String) = self
            .script
            .key(&p.keys[0])
            .key(&p.keys[1])
            .key(&p.keys[2])
            .key(crate::persist::stream_key(&self.settings.key))
            .arg(&p.channel)
            .arg(&p.parts.wire_head)
            .arg(&p.parts.wire_tail)
            .arg(&p.parts.json_head)
            .arg(&p.parts.json_tail)
            .arg(self.settings.history_size)
            .arg(self.settings.history_ttl.as_secs())
            .arg(new_epoch())
            .arg(p.persist)
            .arg(p.draft.namespace.as_str())
            .arg(p.draft.instance.as_deref().unwrap_or_default())
            .arg(p.refresh)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        self.meters
            .publish_seconds
            .record(started.elapsed().as_secs_f64());
        Ok(p.into_message(&self.meters, offset, epoch))
    }

    /// Publishes up to [`MAX_SCRIPT_BATCH`] messages with one script call; the answers come
    /// in the same order.
    async fn publish_chunk(
        &self,
        mut conn: ConnectionManager,
        publications: Vec<Publication>,
    ) -> Vec<Result<Arc<Message>, BrokerError>> {
        let prepared: Vec<Result<Prepared, BrokerError>> =
            publications.into_iter().map(|p| self.prepare(p)).collect();
        let mut call = self.batch_script.prepare_invoke();
        call.key(crate::persist::stream_key(&self.settings.key))
            .arg(self.settings.history_size)
            .arg(self.settings.history_ttl.as_secs())
            .arg(new_epoch())
            .arg(PERSIST_ENTRY_BYTES);
        for p in prepared.iter().flatten() {
            call.key(&p.keys[0]).key(&p.keys[1]).key(&p.keys[2]);
            call.arg(&p.channel)
                .arg(&p.parts.wire_head)
                .arg(&p.parts.wire_tail)
                .arg(&p.parts.json_head)
                .arg(&p.parts.json_tail)
                .arg(p.persist)
                .arg(p.draft.namespace.as_str())
                .arg(p.draft.instance.as_deref().unwrap_or_default())
                .arg(p.refresh);
        }
        let mut replies = if prepared.iter().any(Result::is_ok) {
            let started = Instant::now();
            let replies: Result<Vec<redis::Value>, _> = call.invoke_async(&mut conn).await;
            self.meters
                .publish_seconds
                .record(started.elapsed().as_secs_f64());
            replies
                .map(Vec::into_iter)
                .map_err(|e| redis_error(e).to_string())
        } else {
            Ok(Vec::new().into_iter())
        };
        prepared
            .into_iter()
            .map(|p| {
                let p = p?;
                let (offset, epoch) = match &mut replies {
                    Ok(values) => match (values.next(), values.next()) {
                        (Some(offset), Some(epoch)) => script_answer(offset, epoch)?,
                        _ => {
                            return Err(BrokerError::Unavailable(
                                "the publish script answered too few messages".to_owned(),
                            ));
                        }
                    },
                    Err(error) => return Err(BrokerError::Unavailable(error.clone())),
                };
                Ok(p.into_message(&self.meters, offset, epoch))
            })
            .collect()
    }

    async fn broadcast(
        &self,
        conn: Option<ConnectionManager>,
        key: RoomKey,
        payload: Payload,
    ) -> Result<(), BrokerError> {
        let Some(mut conn) = conn else {
            return match payload {
                Payload::Presence(change) => self.fallback.publish_presence(key, change).await,
                Payload::Event { name, data } => self.fallback.emit(key, name, data).await,
                Payload::Message(_) => Err(BrokerError::Closed),
            };
        };
        let arg = match &payload {
            Payload::Presence(change) => serde_json::to_string(change)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok()),
            Payload::Event { data, .. } => codec::from_json(data).ok(),
            Payload::Message(_) => None,
        }
        .unwrap_or(rmpv::Value::Nil);
        let channels = self.channels(&key.namespace)?;
        let (channel, rooms) = if key.room.is_everyone() {
            (channels.broadcast.clone(), Vec::new())
        } else {
            (channels.room(&key.room), vec![key.room.as_str()])
        };
        let bytes = codec::encode_broadcast(
            &self.settings.uid,
            key.namespace.as_str(),
            payload.event_name(),
            &[arg],
            &rooms,
        );
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(bytes)
            .exec_async(&mut conn)
            .await
            .map_err(redis_error)?;
        metrics::counter!(metric::BROKER_PUBLISHES).increment(1);
        Ok(())
    }

    async fn history(
        &self,
        mut conn: ConnectionManager,
        key: &RoomKey,
        query: HistoryQuery,
    ) -> Result<HistoryPage, BrokerError> {
        let [offset_key, history_key, epoch_key] = room_keys(&self.settings.key, key);
        let limit = query.limit;
        let end = query.before.map_or("+".to_owned(), |b| format!("({b}-0"));
        // The page after offset `from`, up to `end`.
        let after = |from: u64| {
            let mut cmd = redis::cmd("XRANGE");
            cmd.arg(&history_key)
                .arg(format!("({from}-1"))
                .arg(&end)
                .arg("COUNT")
                .arg(limit.max(1));
            cmd
        };
        let mut pipe = redis::pipe();
        pipe.get(&offset_key).get(&epoch_key);
        pipe.cmd("XRANGE")
            .arg(&history_key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
        match query.since {
            Some(since) => {
                pipe.add_command(after(since));
            }
            None => {
                pipe.cmd("XREVRANGE")
                    .arg(&history_key)
                    .arg(&end)
                    .arg("-")
                    .arg("COUNT")
                    .arg(limit.max(1));
            }
        }
        type Entries = Vec<(String, Vec<(String, String)>)>;
        let (top, epoch, first, mut entries): (Option<u64>, Option<String>, Entries, Entries) =
            pipe.query_async(&mut conn).await.map_err(redis_error)?;
        if query.since.is_none() {
            entries.reverse();
        }
        let top = top.unwrap_or(0);
        // The publish scripts trim the stream in whole nodes (`MAXLEN ~`), so it may hold a
        // few entries more than `history_size`: offsets at or below `floor` count as trimmed,
        // exactly as in memory.
        let floor = top.saturating_sub(self.settings.history_size as u64);
        if let Some(since) = query.since
            && since < floor
            && entries.len() >= limit.max(1)
        {
            // The page filled up below the floor: read it again from the floor.
            entries = after(floor)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
        }
        let epoch: Arc<str> = epoch.unwrap_or_else(|| "0".to_owned()).into();
        let mut messages: Vec<Arc<Message>> = entries
            .into_iter()
            .filter_map(|(_, fields)| fields.into_iter().find(|(f, _)| f == "m").map(|(_, v)| v))
            .filter_map(|json| serde_json::from_str::<StoredMessage>(&json).ok())
            .map(|stored| {
                Arc::new(Message {
                    epoch: epoch.clone(),
                    ..stored.into_message(&key.namespace)
                })
            })
            .filter(|m| m.offset > floor)
            .collect();
        if limit == 0 {
            messages.clear();
        }
        let first_kept = first
            .first()
            .and_then(|(id, _)| id.split('-').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(top + 1)
            .max(floor + 1);
        let end = query.before.unwrap_or(u64::MAX).min(top + 1);
        let complete = match query.since {
            Some(since) => {
                let reached = messages
                    .last()
                    .map_or(since.saturating_add(1), |m| m.offset + 1);
                since <= top && since.saturating_add(1) >= first_kept && reached >= end
            }
            None => true,
        };
        Ok(HistoryPage {
            messages,
            position: Position { offset: top, epoch },
            complete,
        })
    }
}

/// A fresh epoch for a room whose history starts over.
fn new_epoch() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}")
}

/// One message's answer from the batch script: its offset and epoch, or why it alone was
/// refused.
fn script_answer(offset: redis::Value, epoch: redis::Value) -> Result<(u64, String), BrokerError> {
    let text = |v: redis::Value| -> Option<String> {
        match v {
            redis::Value::BulkString(b) => String::from_utf8(b).ok(),
            redis::Value::SimpleString(s) | redis::Value::VerbatimString { text: s, .. } => Some(s),
            _ => None,
        }
    };
    match offset {
        redis::Value::Int(off) if off > 0 => text(epoch)
            .map(|e| (off as u64, e))
            .ok_or_else(|| BrokerError::Unavailable("the publish script sent no epoch".to_owned())),
        _ => {
            metrics::counter!(metric::REDIS_ERRORS).increment(1);
            Err(BrokerError::Unavailable(format!(
                "the publish script refused the message: {}",
                text(epoch).unwrap_or_default()
            )))
        }
    }
}

fn redis_error(e: redis::RedisError) -> BrokerError {
    metrics::counter!(metric::REDIS_ERRORS).increment(1);
    BrokerError::Unavailable(e.to_string())
}

impl Broker for RedisBroker {
    fn publish(
        &self,
        publication: Publication,
    ) -> BoxFuture<'_, Result<Arc<Message>, BrokerError>> {
        Box::pin(async move {
            match self.inner.conn() {
                Some(conn) => self.inner.publish(conn, publication).await,
                None => self.inner.fallback.publish(publication).await,
            }
        })
    }

    fn publish_batch(
        &self,
        publications: Vec<Publication>,
    ) -> BoxFuture<'_, Vec<Result<Arc<Message>, BrokerError>>> {
        Box::pin(async move {
            let mut answers = Vec::with_capacity(publications.len());
            let mut rest = publications.into_iter().peekable();
            while rest.peek().is_some() {
                let chunk: Vec<Publication> = rest.by_ref().take(MAX_SCRIPT_BATCH).collect();
                match self.inner.conn() {
                    Some(conn) => answers.extend(self.inner.publish_chunk(conn, chunk).await),
                    None => answers.extend(self.inner.fallback.publish_batch(chunk).await),
                }
            }
            answers
        })
    }

    fn publish_presence(
        &self,
        key: RoomKey,
        change: PresenceChange,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            self.inner
                .broadcast(self.inner.conn(), key, Payload::Presence(change))
                .await
        })
    }

    fn emit(
        &self,
        key: RoomKey,
        event: Arc<str>,
        data: Arc<RawValue>,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            self.inner
                .broadcast(self.inner.conn(), key, Payload::Event { name: event, data })
                .await
        })
    }

    fn history(
        &self,
        key: &RoomKey,
        query: HistoryQuery,
    ) -> BoxFuture<'_, Result<HistoryPage, BrokerError>> {
        let key = key.clone();
        Box::pin(async move {
            match self.inner.conn() {
                Some(conn) => self.inner.history(conn, &key, query).await,
                None => self.inner.fallback.history(&key, query).await,
            }
        })
    }

    fn subscribe(&self, key: &RoomKey) -> BoxFuture<'_, Result<(), BrokerError>> {
        let key = key.clone();
        Box::pin(async move {
            // Namespace-wide broadcasts arrive on the namespace channel, always subscribed.
            if key.room.is_everyone() {
                return Ok(());
            }
            let channel = self.inner.channels(&key.namespace)?.room(&key.room);
            let (tx, rx) = oneshot::channel();
            {
                // Queued under the lock, so the link sees subscriptions in refcount order.
                let mut refs = self.inner.refs.lock().unwrap_or_else(|e| e.into_inner());
                let count = refs.entry(key.clone()).or_insert(0);
                *count += 1;
                if *count > 1 {
                    return Ok(());
                }
                let _ = self.inner.subs.send(SubCmd::Subscribe(channel, key, tx));
            }
            // Without Redis there is nothing to wait for: the link subscribes on reconnect.
            let _ = rx.await;
            Ok(())
        })
    }

    fn unsubscribe(&self, key: &RoomKey) -> BoxFuture<'_, Result<(), BrokerError>> {
        let key = key.clone();
        Box::pin(async move {
            if key.room.is_everyone() {
                return Ok(());
            }
            let channel = self.inner.channels(&key.namespace)?.room(&key.room);
            let mut refs = self.inner.refs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(count) = refs.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    refs.remove(&key);
                    let _ = self.inner.subs.send(SubCmd::Unsubscribe(channel, key));
                }
            }
            Ok(())
        })
    }
}

/// The broker's link to Redis: connects (with capped backoff), holds the subscriptions, reads
/// every channel message, and repairs gaps. Ends when the broker is dropped.
async fn link(inner: std::sync::Weak<Inner>, mut subs: mpsc::UnboundedReceiver<SubCmd>) {
    let mut rooms: HashMap<String, RoomKey> = HashMap::new();
    let mut last: HashMap<RoomKey, u64> = HashMap::new();
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    let mut probes = 0u64;
    loop {
        let Some(broker) = inner.upgrade() else {
            return;
        };
        let probe_channel = probe_channel(&broker.settings);
        match connect(&broker, &rooms).await {
            Ok((conn, pubsub)) => {
                backoff = Duration::from_millis(100);
                *broker.conn.write().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
                broker.connected.send_replace(true);
                if !first {
                    metrics::counter!(metric::REDIS_RECONNECTS).increment(1);
                }
                tracing::info!(url = %broker.settings.redacted_url(), "redis connected: serving as part of the fleet");
                repair_all(&broker, conn.clone(), &mut last).await;
                let (mut sink, mut stream) = pubsub.split();
                let mut probe = tokio::time::interval(broker.settings.probe_interval);
                probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                probe.reset();
                let mut awaiting = false;
                loop {
                    tokio::select! {
                        _ = probe.tick() => {
                            if awaiting {
                                metrics::counter!(metric::PUBSUB_PROBE_FAILURES).increment(1);
                                tracing::warn!("redis pub/sub connection delivers nothing: reconnecting");
                                break;
                            }
                            awaiting = true;
                            probes += 1;
                            send_probe(conn.clone(), probe_channel.clone(), probes);
                        }
                        cmd = subs.recv() => {
                            let Some(cmd) = cmd else { return };
                            let mut batch = vec![cmd];
                            while let Ok(more) = subs.try_recv() {
                                batch.push(more);
                            }
                            let (add, remove) = plan(batch, &mut rooms, &mut last);
                            let ok = (add.channels.is_empty() || sink.subscribe(&add.channels).await.is_ok())
                                && (remove.is_empty() || sink.unsubscribe(&remove).await.is_ok());
                            for reply in add.replies {
                                let _ = reply.send(());
                            }
                            if !ok {
                                break;
                            }
                        }
                        msg = stream.next() => {
                            let Some(msg) = msg else { break };
                            // Anything that arrives proves the connection alive: under load the
                            // probe may wait behind seconds of messages, and is not needed then.
                            awaiting = false;
                            if msg.get_channel_name() == probe_channel {
                                continue;
                            }
                            on_message(&broker, &rooms, &mut last, msg).await;
                        }
                    }
                }
                broker.connected.send_replace(false);
                metrics::counter!(metric::REDIS_ERRORS).increment(1);
                tracing::warn!(
                    "redis connection lost: serving this instance alone until it is back"
                );
            }
            Err(e) => {
                metrics::counter!(metric::REDIS_ERRORS).increment(1);
                if first {
                    tracing::warn!(error = %e, "redis unreachable at start: serving this instance alone and retrying");
                } else {
                    tracing::debug!(error = %e, ?backoff, "redis still unreachable");
                }
            }
        }
        first = false;
        drop(broker);
        // Subscription changes made while Redis is away only update the wanted set.
        let wait = tokio::time::sleep(backoff);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = &mut wait => break,
                cmd = subs.recv() => {
                    let Some(cmd) = cmd else { return };
                    let (add, _) = plan(vec![cmd], &mut rooms, &mut last);
                    for reply in add.replies {
                        let _ = reply.send(());
                    }
                }
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The channel of this instance's liveness probes: under the adapter's prefix, but outside
/// its `#<nsp>#` channels, so no adapter ever reads it.
fn probe_channel(settings: &RedisSettings) -> String {
    format!("herald-probe#{}#{}", settings.key, settings.uid)
}

/// Publishes one probe without holding up the link; a probe that fails to go out simply
/// does not come back, and the next tick reconnects.
fn send_probe(mut conn: ConnectionManager, channel: String, seq: u64) {
    tokio::spawn(async move {
        let sent: redis::RedisResult<u64> = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(seq)
            .query_async(&mut conn)
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "redis probe not published");
        }
    });
}

struct Additions {
    channels: Vec<String>,
    replies: Vec<oneshot::Sender<()>>,
}

fn plan(
    batch: Vec<SubCmd>,
    rooms: &mut HashMap<String, RoomKey>,
    last: &mut HashMap<RoomKey, u64>,
) -> (Additions, Vec<String>) {
    let mut add = Additions {
        channels: Vec::new(),
        replies: Vec::new(),
    };
    let mut remove = Vec::new();
    for cmd in batch {
        match cmd {
            SubCmd::Subscribe(channel, key, reply) => {
                remove.retain(|c| *c != channel);
                rooms.insert(channel.clone(), key);
                add.channels.push(channel);
                add.replies.push(reply);
            }
            SubCmd::Unsubscribe(channel, key) => {
                add.channels.retain(|c| *c != channel);
                rooms.remove(&channel);
                last.remove(&key);
                remove.push(channel);
            }
        }
    }
    (add, remove)
}

async fn connect(
    broker: &Inner,
    rooms: &HashMap<String, RoomKey>,
) -> Result<(ConnectionManager, redis::aio::PubSub), redis::RedisError> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(Duration::from_secs(3)));
    let conn = ConnectionManager::new_with_config(broker.client.clone(), config).await?;
    let mut pubsub = broker.client.get_async_pubsub().await?;
    let mut channels: Vec<String> = rooms.keys().cloned().collect();
    channels.push(probe_channel(&broker.settings));
    for ch in broker.channels.values() {
        channels.push(ch.broadcast.clone());
        channels.push(ch.request.clone());
    }
    pubsub.subscribe(&channels).await?;
    Ok((conn, pubsub))
}

/// After a reconnect, delivers what each subscribed room missed, from history.
async fn repair_all(broker: &Inner, conn: ConnectionManager, last: &mut HashMap<RoomKey, u64>) {
    let rooms: Vec<(RoomKey, u64)> = last.iter().map(|(k, v)| (k.clone(), *v)).collect();
    for (key, seen) in rooms {
        repair(broker, conn.clone(), &key, seen, None, last).await;
    }
}

/// Delivers the room's messages after `seen` (and before `until`) from history.
async fn repair(
    broker: &Inner,
    conn: ConnectionManager,
    key: &RoomKey,
    seen: u64,
    until: Option<u64>,
    last: &mut HashMap<RoomKey, u64>,
) {
    let query = HistoryQuery {
        since: Some(seen),
        before: until,
        limit: 10_000,
    };
    match broker.history(conn, key, query).await {
        Ok(page) => {
            metrics::counter!(metric::GAPS_REPAIRED).increment(page.messages.len() as u64);
            for message in page.messages {
                last.insert(key.clone(), message.offset);
                broker
                    .local
                    .deliver(Delivery::new(key.clone(), Payload::Message(message)))
                    .await;
            }
        }
        Err(e) => {
            tracing::warn!(room = %key, error = %e, "gap repair failed; clients recover by offset")
        }
    }
}

async fn on_message(
    broker: &Arc<Inner>,
    rooms: &HashMap<String, RoomKey>,
    last: &mut HashMap<RoomKey, u64>,
    msg: redis::Msg,
) {
    let channel = msg.get_channel_name();
    for (namespace, channels) in &broker.channels {
        if channel == channels.request {
            metrics::counter!(metric::BROKER_RECEIVES, "kind" => "request").increment(1);
            let (broker, namespace) = (broker.clone(), namespace.clone());
            let bytes = msg.get_payload_bytes().to_vec();
            tokio::spawn(async move {
                request::handle(&broker.request_context(), &namespace, &bytes).await
            });
            return;
        }
        let Some(room) = channels.room_of(channel) else {
            continue;
        };
        let (kind, receives) = match room {
            Some(_) => ("room", &broker.meters.receives_room),
            None => ("namespace", &broker.meters.receives_namespace),
        };
        receives.increment(1);
        let broadcast = match codec::decode_broadcast(msg.get_payload_bytes()) {
            Ok(b) => b,
            Err(e) => {
                metrics::counter!(metric::BROKER_DECODE_ERRORS, "kind" => kind).increment(1);
                tracing::debug!(channel, error = %e, "ignoring an unreadable broadcast");
                return;
            }
        };
        if broadcast.namespace != namespace.as_str() {
            return;
        }
        let targets: Vec<RoomName> = match room {
            Some(room) => RoomName::new(room)
                .ok()
                .filter(|r| rooms.contains_key(&channels.room(r)))
                .into_iter()
                .collect(),
            None if broadcast.rooms.is_empty() => vec![RoomName::everyone()],
            None => broadcast
                .rooms
                .iter()
                .filter_map(|r| RoomName::new(r).ok())
                .collect(),
        };
        for room in targets {
            let key = RoomKey::new(namespace.clone(), room);
            deliver(broker, last, key, &broadcast).await;
        }
        return;
    }
}

async fn deliver(
    broker: &Inner,
    last: &mut HashMap<RoomKey, u64>,
    key: RoomKey,
    broadcast: &Broadcast,
) {
    let first = broadcast.args.first().unwrap_or(&rmpv::Value::Nil);
    let payload = match broadcast.event.as_str() {
        "message" => match codec::message_from_arg(&key.namespace, first) {
            Some(message) => {
                let seen = last.get(&key).copied();
                match seen {
                    // A repeat, unless the room's history started over.
                    Some(seen) if message.offset <= seen && message.offset != 1 => return,
                    Some(seen) if message.offset > seen + 1 => {
                        if let Some(conn) = broker.conn() {
                            repair(broker, conn, &key, seen, Some(message.offset), last).await;
                        }
                    }
                    _ => {}
                }
                last.insert(key.clone(), message.offset);
                let latency = crate::now_ms() - message.ts;
                broker.meters.latency.record(latency.max(0) as f64 / 1000.0);
                Payload::Message(Arc::new(message))
            }
            None => event_payload(broadcast, first),
        },
        "presence" => match serde_json::to_string(first)
            .ok()
            .and_then(|t| serde_json::from_str::<PresenceJson>(&t).ok())
        {
            Some(p) => Payload::Presence(p.into()),
            None => event_payload(broadcast, first),
        },
        _ => event_payload(broadcast, first),
    };
    let except = broadcast
        .except
        .iter()
        .filter_map(|r| RoomName::new(r).ok())
        .collect();
    broker
        .local
        .deliver(Delivery {
            key,
            payload,
            except,
        })
        .await;
}

fn event_payload(broadcast: &Broadcast, first: &rmpv::Value) -> Payload {
    let data = codec::to_json(first).unwrap_or_else(|_| RawValue::NULL.to_owned());
    Payload::Event {
        name: broadcast.event.as_str().into(),
        data: data.into(),
    }
}

#[derive(serde::Deserialize)]
struct PresenceJson {
    room: RoomName,
    user: String,
    status: herald_core::PresenceStatus,
}

impl From<PresenceJson> for PresenceChange {
    fn from(p: PresenceJson) -> Self {
        PresenceChange {
            room: p.room,
            user: herald_core::UserId::new(p.user),
            status: p.status,
        }
    }
}

impl Inner {
    fn request_context(self: &Arc<Self>) -> request::Context {
        request::Context {
            uid: self.settings.uid.clone(),
            conn: self.conn(),
            channels: self.channels.clone(),
            local: self.local.clone(),
        }
    }
}
