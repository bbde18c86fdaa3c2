//! The hub: the heart of an instance. It holds the local room index, publishes through the
//! broker and delivers what the broker hands back to the local members of each room.
//!
//! The room index is split across shard tasks (one per core), each owning its rooms outright:
//! deliveries, joins and leaves of a room are commands to its shard, handled one at a time, so
//! every member of a room sees the same order whatever its transport, with no locks.

mod members;
mod shard;

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herald_core::{
    BoxFuture, Broker, ConnId, Delivery, DeliverySink, HistoryPage, HistoryQuery, LocalNode,
    LocalSocket, Message, Namespace, Payload, PersistQueue, Position, Presence, PresenceChange,
    PresenceStatus, Publication, RemoteAction, RoomKey, RoomName, RoomPatterns, Selector, Store,
    UserId,
};
use serde_json::value::RawValue;
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::mailbox;
use crate::metrics as m;
use crate::protocol::{ClientError, ErrorCode, MAX_HISTORY_LIMIT};
use shard::{Shard, ShardCmd};

/// Replayed messages sent to a connection before its replay lets the connection's writer run.
const REPLAY_STRIDE: usize = 32;

/// Lets other tasks run every [`REPLAY_STRIDE`] messages of a replay. A connection's
/// websocket write buffer keeps the largest size it reaches until the connection closes, and
/// it fills with whatever is queued when the writer runs: a replay that queued a thousand
/// messages before its writer ran would leave the connection holding them all in capacity.
async fn pace(sent: usize) {
    if sent > 0 && sent.is_multiple_of(REPLAY_STRIDE) {
        tokio::task::yield_now().await;
    }
}

/// Commands queued per shard before the broker waits for the shard to catch up.
const SHARD_QUEUE: usize = 64 * 1024;
/// How long a recovering join may take to catch up with live traffic before it gives up on
/// the gap (and reports `recovered: false`).
const RECOVERY_DEADLINE: Duration = Duration::from_secs(10);

/// The epoch a room reports before its first message (the Redis broker assigns the epoch
/// with the first offset). Offsets a client saw after it count in the room's first epoch, so
/// a client naming it is taken to mean the current one.
const NO_EPOCH_YET: &str = "0";

/// How deliveries reach one local connection.
#[derive(Clone)]
pub enum Sink {
    /// Plain WebSocket: deliveries are queued to the connection's writer task. `kick` closes
    /// the connection when its queue stays full.
    Queue {
        tx: mpsc::Sender<Queued>,
        kick: CancellationToken,
    },
    /// Socket.IO: live deliveries reach the socket through its socketioxide room, one
    /// broadcast per room; replays are emitted to the socket alone.
    Sio(SocketRef),
}

/// What a queue-fed connection's writer receives, in one order: deliveries and the
/// connection's own replies share the queue, so a reply never overtakes a replay.
pub enum Queued {
    Delivery(Arc<Outgoing>),
    Reply(serde_json::Value),
}

/// A local connection, as the hub knows it.
pub struct Conn {
    pub id: ConnId,
    pub user: UserId,
    pub sink: Sink,
}

impl Conn {
    /// Sends one delivery to this connection alone, waiting while its queue is full, up to
    /// `deadline`. Used for replays, which must not be dropped.
    async fn send(&self, out: Arc<Outgoing>, deadline: Instant) -> Result<(), ()> {
        match &self.sink {
            Sink::Queue { tx, .. } => {
                let wait = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(wait, tx.send(Queued::Delivery(out))).await {
                    Ok(Ok(())) => Ok(()),
                    _ => Err(()),
                }
            }
            Sink::Sio(socket) => {
                crate::transport::sio::emit_one(socket, &out.payload, deadline).await
            }
        }
    }
}

/// One delivery, shared by every local member of the room. Each transport encodes it at most
/// once, however many members it has.
pub struct Outgoing {
    pub payload: Payload,
    /// The plain-WebSocket frame, encoded by the first WebSocket member that needs it.
    pub(crate) ws_frame: OnceLock<axum::extract::ws::Utf8Bytes>,
}

impl Outgoing {
    pub fn new(payload: Payload) -> Self {
        Self {
            payload,
            ws_frame: OnceLock::new(),
        }
    }
}

/// The outcome of a join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The latest offset the connection has been brought up to.
    pub offset: u64,
    pub epoch: Arc<str>,
    /// Whether every message after `since` was re-sent (false without `since`).
    pub recovered: bool,
}

/// What another server (through the broker) asks a local session to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Join(RoomName),
    Leave(RoomName),
    Disconnect,
}

/// Routes deliveries from the broker to the shard that owns the room, and answers the
/// broker's questions about local connections.
#[derive(Clone)]
pub struct Router {
    shards: Arc<[mpsc::Sender<ShardCmd>]>,
    hasher: RandomState,
    sessions: Arc<Mutex<HashMap<ConnId, mailbox::Sender<Control>>>>,
}

impl Router {
    fn shard(&self, key: &RoomKey) -> &mpsc::Sender<ShardCmd> {
        let index = self.hasher.hash_one(key) as usize % self.shards.len();
        &self.shards[index]
    }

    async fn call<T>(
        &self,
        key: &RoomKey,
        cmd: impl FnOnce(oneshot::Sender<T>) -> ShardCmd,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.shard(key).send(cmd(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Registers a session for remote control; the receiver yields what it is asked to do.
    pub fn register(&self, conn: &ConnId) -> mailbox::Receiver<Control> {
        let (tx, rx) = mailbox::unbounded();
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn.clone(), tx);
        rx
    }

    pub fn deregister(&self, conn: &ConnId) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(conn);
    }

    async fn select(&self, namespace: &Namespace, selector: &Selector) -> Vec<LocalSocket> {
        let mut conns: HashMap<ConnId, (UserId, BTreeSet<RoomName>)> = HashMap::new();
        for shard in self.shards.iter() {
            let (tx, rx) = oneshot::channel();
            let cmd = ShardCmd::Members {
                namespace: namespace.clone(),
                reply: tx,
            };
            if shard.send(cmd).await.is_err() {
                continue;
            }
            for (room, conn, user) in rx.await.unwrap_or_default() {
                conns
                    .entry(conn)
                    .or_insert_with(|| (user, BTreeSet::new()))
                    .1
                    .insert(room);
            }
        }
        // A connection is also addressed by its id, as Socket.IO sockets are.
        let picks = |rooms: &[RoomName], id: &ConnId, mine: &BTreeSet<RoomName>| {
            rooms
                .iter()
                .any(|r| mine.contains(r) || r.as_str() == id.as_str())
        };
        conns
            .into_iter()
            .filter(|(id, (_, rooms))| {
                selector.rooms.is_empty() || picks(&selector.rooms, id, rooms)
            })
            .filter(|(id, (_, rooms))| !picks(&selector.except, id, rooms))
            .map(|(id, (user, rooms))| {
                let rooms = rooms
                    .into_iter()
                    .filter(|r| !r.is_everyone() && r.as_str() != id.as_str())
                    .collect();
                LocalSocket { id, user, rooms }
            })
            .collect()
    }
}

impl DeliverySink for Router {
    fn deliver(&self, delivery: Delivery) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let excluded = if delivery.except.is_empty() {
                None
            } else {
                let selector = Selector {
                    rooms: delivery.except.clone(),
                    except: Vec::new(),
                };
                let skip = self.select(&delivery.key.namespace, &selector).await;
                Some(Arc::new(skip.into_iter().map(|s| s.id).collect()))
            };
            let shard = self.shard(&delivery.key);
            if shard
                .send(ShardCmd::Deliver(delivery, excluded))
                .await
                .is_err()
            {
                metrics::counter!(m::MESSAGES_DROPPED, "reason" => "shutdown").increment(1);
            }
        })
    }
}

impl LocalNode for Router {
    fn sockets(
        &self,
        namespace: &Namespace,
        selector: &Selector,
    ) -> BoxFuture<'_, Vec<LocalSocket>> {
        let (namespace, selector) = (namespace.clone(), selector.clone());
        Box::pin(async move { self.select(&namespace, &selector).await })
    }

    fn apply(
        &self,
        namespace: &Namespace,
        selector: &Selector,
        action: RemoteAction,
    ) -> BoxFuture<'_, usize> {
        let (namespace, selector) = (namespace.clone(), selector.clone());
        Box::pin(async move {
            let targets = self.select(&namespace, &selector).await;
            let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            let controls: Vec<Control> = match action {
                RemoteAction::Join(rooms) => rooms.into_iter().map(Control::Join).collect(),
                RemoteAction::Leave(rooms) => rooms.into_iter().map(Control::Leave).collect(),
                RemoteAction::Disconnect => vec![Control::Disconnect],
            };
            let mut reached = 0;
            for target in &targets {
                if let Some(tx) = sessions.get(&target.id) {
                    reached += 1;
                    for control in &controls {
                        let _ = tx.try_send(control.clone());
                    }
                }
            }
            reached
        })
    }
}

/// The shards' receiving ends, waiting for [`Hub::start`].
pub struct Shards(Vec<mpsc::Receiver<ShardCmd>>);

/// Creates the router the broker delivers into, and the shards behind it.
pub fn router(shards: usize) -> (Router, Shards) {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards.max(1))
        .map(|_| mpsc::channel(SHARD_QUEUE))
        .unzip();
    (
        Router {
            shards: senders.into(),
            hasher: RandomState::new(),
            sessions: Default::default(),
        },
        Shards(receivers),
    )
}

/// The durable path as the hub sees it: where published messages are queued, which rooms
/// persist, and the store that history falls back to.
pub struct Durable {
    pub queue: Arc<dyn PersistQueue>,
    pub store: Arc<dyn Store>,
    pub rooms: RoomPatterns,
}

/// The engines a hub works with.
pub struct HubEngines {
    pub broker: Arc<dyn Broker>,
    pub presence: Arc<dyn Presence>,
    pub durable: Option<Durable>,
}

/// The hub of one instance.
pub struct Hub {
    instance: Arc<str>,
    broker: Arc<dyn Broker>,
    presence: Arc<dyn Presence>,
    router: Router,
    durable: Option<Durable>,
    /// `herald_messages_published_total`, looked up once rather than per message.
    published: metrics::Counter,
}

impl Hub {
    /// Starts the shard tasks, which run until `shutdown` is cancelled.
    pub fn start(
        instance: &str,
        engines: HubEngines,
        router: Router,
        shards: Shards,
        sio: Arc<OnceLock<SocketIo>>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        for rx in shards.0 {
            tokio::spawn(Shard::new(rx, sio.clone()).run(shutdown.clone()));
        }
        let HubEngines {
            broker,
            presence,
            durable,
        } = engines;
        Arc::new(Self {
            instance: instance.into(),
            broker,
            presence,
            router,
            durable,
            published: metrics::counter!(m::MESSAGES_PUBLISHED),
        })
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The durable path, when `room` persists.
    fn durable_for(&self, room: &RoomName) -> Option<&Durable> {
        self.durable.as_ref().filter(|d| d.rooms.allows(room))
    }

    /// Whether the store answers within 2 s and takes writes; `Ok` when nothing is stored.
    pub async fn store_ready(&self) -> Result<(), String> {
        let Some(durable) = &self.durable else {
            return Ok(());
        };
        if let Err(e) = durable.queue.accepting() {
            return Err(format!(
                "writes failing, messages to persisted rooms are refused: {e}"
            ));
        }
        match tokio::time::timeout(Duration::from_secs(2), durable.store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("store did not answer within 2s".to_owned()),
        }
    }

    /// Registers a session for remote control (see [`Router::register`]).
    pub fn register(&self, conn: &ConnId) -> mailbox::Receiver<Control> {
        self.router.register(conn)
    }

    pub fn deregister(&self, conn: &ConnId) {
        self.router.deregister(conn);
    }

    /// Adds `conn` to the room. With `since`, first re-sends every kept message after it, in
    /// order, then switches the connection to live delivery with nothing missed or repeated.
    /// With `presence`, the user's arrival is announced to the room (once per user).
    pub async fn join(
        &self,
        conn: &Arc<Conn>,
        key: RoomKey,
        since: Option<u64>,
        presence: bool,
    ) -> Result<Joined, ClientError> {
        self.join_at(conn, key, since, None, presence).await
    }

    /// [`Hub::join`], with `since` counted in `epoch` when given: if the room is in another
    /// epoch now (it started over, or this instance served alone while Redis was away), the
    /// offsets do not compare, so nothing is re-sent and `recovered` is false.
    pub async fn join_at(
        &self,
        conn: &Arc<Conn>,
        key: RoomKey,
        since: Option<u64>,
        epoch: Option<&str>,
        presence: bool,
    ) -> Result<Joined, ClientError> {
        self.broker.subscribe(&key).await.map_err(unavailable)?;
        let conn_ref = conn.clone();
        let recovering = since.is_some();
        let added = self
            .router
            .call(&key, |reply| ShardCmd::Join {
                conn: conn_ref,
                key: key.clone(),
                recovering,
                reply,
            })
            .await
            .ok_or_else(shutting_down)?;
        if !added {
            // Already a member: the broker subscription taken above is not needed twice.
            self.release(&key).await;
        }
        let joined = match since {
            Some(since) if added => self.recover(conn, &key, since, epoch).await?,
            _ => {
                let page = self.history(&key, HistoryQuery::default()).await?;
                Joined {
                    offset: page.position.offset,
                    epoch: page.position.epoch,
                    recovered: false,
                }
            }
        };
        if added && presence {
            match self.presence.add(&key, &conn.user, &conn.id).await {
                Ok(true) => self.announce(&key, &conn.user, PresenceStatus::Join).await,
                Ok(false) => {}
                Err(e) => tracing::warn!(room = %key, error = %e, "presence add failed"),
            }
        }
        Ok(joined)
    }

    async fn recover(
        &self,
        conn: &Arc<Conn>,
        key: &RoomKey,
        since: u64,
        epoch: Option<&str>,
    ) -> Result<Joined, ClientError> {
        let deadline = Instant::now() + RECOVERY_DEADLINE;
        let query = HistoryQuery {
            since: Some(since),
            before: None,
            limit: MAX_HISTORY_LIMIT,
        };
        let page = match self.history(key, query).await {
            Ok(page) => page,
            Err(e) => {
                // The connection must not stay in recovery: go live and report the gap.
                self.catch_up(conn, key, 0, None, Instant::now()).await;
                return Err(e);
            }
        };
        if epoch.is_some_and(|e| e != NO_EPOCH_YET && e != &*page.position.epoch) {
            // Go live, sending only what arrived meanwhile.
            let (_, last) = self.catch_up(conn, key, 0, None, Instant::now()).await;
            return Ok(Joined {
                offset: last.max(page.position.offset),
                epoch: page.position.epoch,
                recovered: false,
            });
        }
        let mut last = since;
        let mut last_epoch = None;
        let mut recovered = page.complete;
        for (sent, message) in page.messages.iter().enumerate() {
            pace(sent).await;
            let out = Arc::new(Outgoing::new(Payload::Message(message.clone())));
            if conn.send(out, deadline).await.is_err() {
                recovered = false;
                break;
            }
            last = message.offset;
            last_epoch = Some(message.epoch.clone());
        }
        let (caught_up, last) = self.catch_up(conn, key, last, last_epoch, deadline).await;
        // `last` starts at `since`, which may be beyond the room's end; only offsets actually
        // delivered may raise the position reported.
        let delivered = if last > since { last } else { 0 };
        Ok(Joined {
            offset: delivered.max(page.position.offset),
            epoch: page.position.epoch,
            recovered: recovered && caught_up,
        })
    }

    /// Replays what arrived for the room while `conn` was recovering, until nothing is left
    /// and the shard switches it to live delivery. Returns whether nothing was lost, and the
    /// last message offset sent.
    ///
    /// History may hold messages that the broker has not handed to this instance yet (a room
    /// subscribed a moment ago); the shard is told the last one replayed (`last` in
    /// `last_epoch`), so that it skips them when they arrive live.
    async fn catch_up(
        &self,
        conn: &Arc<Conn>,
        key: &RoomKey,
        mut last: u64,
        mut last_epoch: Option<Arc<str>>,
        deadline: Instant,
    ) -> (bool, u64) {
        let mut complete = true;
        loop {
            let force = Instant::now() >= deadline;
            let id = conn.id.clone();
            let Some(batch) = self
                .router
                .call(key, |reply| ShardCmd::CatchUp {
                    conn: id,
                    key: key.clone(),
                    force,
                    replayed: last_epoch.clone().map(|epoch| (epoch, last)),
                    reply,
                })
                .await
            else {
                return (false, last);
            };
            complete &= !batch.overflowed && !force;
            for (sent, out) in batch.pending.into_iter().enumerate() {
                pace(sent).await;
                if let Payload::Message(message) = &out.payload {
                    if message.offset <= last {
                        continue;
                    }
                    last = message.offset;
                    last_epoch = Some(message.epoch.clone());
                }
                if conn.send(out, deadline).await.is_err() {
                    complete = false;
                }
            }
            if batch.live {
                return (complete, last);
            }
        }
    }

    /// Removes `conn` from the room; with `presence`, announces the user's departure when it
    /// was their last connection there. Returns whether it was a member.
    pub async fn leave(&self, conn: &Conn, key: &RoomKey, presence: bool) -> bool {
        let id = conn.id.clone();
        let was_member = self
            .router
            .call(key, |reply| ShardCmd::Leave {
                conn: id,
                key: key.clone(),
                reply,
            })
            .await
            .unwrap_or(false);
        if !was_member {
            return false;
        }
        self.release(key).await;
        if presence {
            match self.presence.remove(key, &conn.user, &conn.id).await {
                Ok(true) => self.announce(key, &conn.user, PresenceStatus::Leave).await,
                Ok(false) => {}
                Err(e) => tracing::warn!(room = %key, error = %e, "presence remove failed"),
            }
        }
        true
    }

    async fn release(&self, key: &RoomKey) {
        if let Err(e) = self.broker.unsubscribe(key).await {
            tracing::warn!(room = %key, error = %e, "broker unsubscribe failed");
        }
    }

    async fn announce(&self, key: &RoomKey, user: &UserId, status: PresenceStatus) {
        let change = PresenceChange {
            room: key.room.clone(),
            user: user.clone(),
            status,
        };
        if let Err(e) = self.broker.publish_presence(key.clone(), change).await {
            tracing::warn!(room = %key, error = %e, "presence announcement failed");
        }
    }

    /// Publishes a message to the room, as `from`.
    pub async fn publish(
        &self,
        key: RoomKey,
        from: UserId,
        data: Box<RawValue>,
    ) -> Result<Arc<Message>, ClientError> {
        let publication = self.publication(key, from, data)?;
        let message = self
            .broker
            .publish(publication)
            .await
            .map_err(unavailable)?;
        self.published(message).await
    }

    /// Publishes several messages, in order, as [`Hub::publish`] would one by one, with one
    /// broker round trip per chunk rather than per message. Each message succeeds or fails
    /// alone; the answers come in the same order.
    pub async fn publish_batch(
        &self,
        items: Vec<(RoomKey, UserId, Box<RawValue>)>,
    ) -> Vec<Result<Arc<Message>, ClientError>> {
        // Refusals in place, `None` where the broker answers.
        let mut checked = Vec::with_capacity(items.len());
        let mut publications = Vec::with_capacity(items.len());
        for (key, from, data) in items {
            match self.publication(key, from, data) {
                Ok(publication) => {
                    publications.push(publication);
                    checked.push(None);
                }
                Err(e) => checked.push(Some(e)),
            }
        }
        let mut published = self.broker.publish_batch(publications).await.into_iter();
        let mut answers = Vec::with_capacity(checked.len());
        for refusal in checked {
            if let Some(e) = refusal {
                answers.push(Err(e));
                continue;
            }
            answers.push(match published.next() {
                Some(Ok(message)) => self.published(message).await,
                Some(Err(e)) => Err(unavailable(e)),
                None => Err(ClientError::new(
                    ErrorCode::Unavailable,
                    "the broker gave no answer",
                )),
            });
        }
        answers
    }

    /// The publication of a message, or why it is refused before it takes an offset: a
    /// room that persists refuses while the store keeps failing, so nobody receives a
    /// message that is not kept.
    fn publication(
        &self,
        key: RoomKey,
        from: UserId,
        data: Box<RawValue>,
    ) -> Result<Publication, ClientError> {
        let durable = self.durable_for(&key.room);
        if let Some(durable) = durable {
            durable.queue.accepting().map_err(|e| {
                metrics::counter!(m::MESSAGES_DROPPED, "reason" => "store_unavailable")
                    .increment(1);
                ClientError::new(
                    ErrorCode::StoreUnavailable,
                    format!("message not accepted: the store keeps failing ({e})"),
                )
            })?;
        }
        Ok(Publication {
            key,
            id: uuid::Uuid::now_v7().to_string(),
            from,
            data,
            ts: now_ms(),
            persist: durable.is_some(),
            instance: Some(self.instance.clone()),
        })
    }

    /// Counts a published message and queues it for the store when its room persists.
    async fn published(&self, message: Arc<Message>) -> Result<Arc<Message>, ClientError> {
        self.published.increment(1);
        if let Some(durable) = self.durable_for(&message.room) {
            // Waits while the queue is full: an ack means the message is queued for the store.
            durable.queue.push(message.clone()).await.map_err(|e| {
                ClientError::new(
                    ErrorCode::Unavailable,
                    format!("message {} not queued for storage: {e}", message.offset),
                )
            })?;
        }
        Ok(message)
    }

    /// Emits an arbitrary event to the room, without recording it.
    pub async fn emit(
        &self,
        key: RoomKey,
        event: &str,
        data: Arc<RawValue>,
    ) -> Result<(), ClientError> {
        self.broker
            .emit(key, event.into(), data)
            .await
            .map_err(unavailable)
    }

    pub async fn presence(&self, key: &RoomKey) -> Result<Vec<UserId>, ClientError> {
        self.presence
            .users(key)
            .await
            .map_err(|e| ClientError::new(ErrorCode::Unavailable, e.to_string()))
    }

    /// A room's history in `epoch`: from [`Hub::history`] when that is the room's epoch now
    /// (or none is given), otherwise from the store's rows of that epoch alone, with the page's
    /// position at the last of them.
    pub async fn history_in(
        &self,
        key: &RoomKey,
        epoch: Option<&str>,
        query: HistoryQuery,
    ) -> Result<HistoryPage, ClientError> {
        let page = self.history(key, query).await?;
        let Some(epoch) = epoch.filter(|e| *e != NO_EPOCH_YET && *e != &*page.position.epoch)
        else {
            return Ok(page);
        };
        let stored = match self.durable_for(&key.room) {
            Some(durable) => durable
                .store
                .history(key, epoch, query)
                .await
                .map_err(|e| ClientError::new(ErrorCode::Unavailable, e.to_string()))?,
            None => Vec::new(),
        };
        Ok(HistoryPage {
            position: Position {
                offset: stored.last().map_or(0, |m| m.offset),
                epoch: epoch.into(),
            },
            complete: false,
            messages: stored,
        })
    }

    /// A room's history from the broker, completed from the store where the broker no longer
    /// holds the range.
    pub async fn history(
        &self,
        key: &RoomKey,
        query: HistoryQuery,
    ) -> Result<HistoryPage, ClientError> {
        let mut page = self.broker.history(key, query).await.map_err(unavailable)?;
        let Some(durable) = self.durable_for(&key.room) else {
            return Ok(page);
        };
        let first_held = page
            .messages
            .first()
            .map_or(page.position.offset + 1, |m| m.offset);
        let older_needed = match query.since {
            Some(since) => !page.complete && since + 1 < first_held,
            None => page.messages.len() < query.limit && first_held > 1,
        };
        if !older_needed {
            return Ok(page);
        }
        let before = query.before.map_or(first_held, |b| b.min(first_held));
        let want = match query.since {
            Some(_) => query.limit,
            None => query.limit - page.messages.len(),
        };
        let older = HistoryQuery {
            since: query.since,
            before: Some(before),
            limit: want,
        };
        let stored = match durable
            .store
            .history(key, &page.position.epoch, older)
            .await
        {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(room = %key, error = %e, "store history unavailable");
                return Ok(page);
            }
        };
        let mut messages = stored;
        messages.append(&mut page.messages);
        messages.truncate(query.limit);
        if let Some(since) = query.since {
            let end = query
                .before
                .unwrap_or(u64::MAX)
                .min(page.position.offset + 1);
            let consecutive = messages
                .iter()
                .enumerate()
                .all(|(i, m)| m.offset == since + 1 + i as u64);
            let reached = messages.last().map_or(since + 1, |m| m.offset + 1);
            page.complete = since <= page.position.offset && consecutive && reached >= end;
        }
        page.messages = messages;
        Ok(page)
    }
}

fn unavailable(e: herald_core::BrokerError) -> ClientError {
    ClientError::new(ErrorCode::Unavailable, e.to_string())
}

fn shutting_down() -> ClientError {
    ClientError::new(ErrorCode::Unavailable, "the server is shutting down")
}

/// The current time in unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use herald_core::memory::{MemoryBroker, MemoryPresence};
    use herald_core::{Namespace, RoomName};

    use super::*;

    struct Harness {
        hub: Arc<Hub>,
        _stop: tokio_util::sync::DropGuard,
    }

    fn hub(history_size: usize) -> Harness {
        let (router, shards) = router(2);
        let broker = Arc::new(MemoryBroker::new(history_size, Arc::new(router.clone())));
        let stop = CancellationToken::new();
        let engines = HubEngines {
            broker,
            presence: Arc::new(MemoryPresence::new()),
            durable: None,
        };
        let hub = Hub::start(
            "unit",
            engines,
            router,
            shards,
            Arc::new(OnceLock::new()),
            stop.clone(),
        );
        Harness {
            hub,
            _stop: stop.drop_guard(),
        }
    }

    fn conn(id: &str, user: &str) -> (Arc<Conn>, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(4096);
        let sink = Sink::Queue {
            tx,
            kick: CancellationToken::new(),
        };
        (
            Arc::new(Conn {
                id: ConnId::new(id),
                user: UserId::new(user),
                sink,
            }),
            rx,
        )
    }

    fn key(room: &str) -> RoomKey {
        RoomKey::new(Namespace::root(), RoomName::new(room).expect("room"))
    }

    fn data(i: u64) -> Box<RawValue> {
        RawValue::from_string(i.to_string()).expect("json")
    }

    /// Drains what is queued now: message offsets and presence changes, in order.
    fn drain(rx: &mut mpsc::Receiver<Queued>) -> (Vec<u64>, Vec<(String, PresenceStatus)>) {
        let (mut offsets, mut presence) = (Vec::new(), Vec::new());
        while let Ok(Queued::Delivery(out)) = rx.try_recv() {
            match &out.payload {
                Payload::Message(m) => offsets.push(m.offset),
                Payload::Presence(p) => presence.push((p.user.to_string(), p.status)),
                Payload::Event { .. } => {}
            }
        }
        (offsets, presence)
    }

    async fn settle(h: &Harness, room: &RoomKey) {
        // A round trip through the room's shard: everything queued before it has been applied.
        let (probe, _rx) = conn("probe", "probe");
        h.hub
            .join(&probe, room.clone(), None, false)
            .await
            .expect("probe join");
        h.hub.leave(&probe, room, false).await;
    }

    #[tokio::test]
    async fn offsets_count_per_room_and_join_reports_the_latest() {
        let h = hub(10);
        let (a, mut rx) = conn("a", "alice");
        let joined = h.hub.join(&a, key("r1"), None, true).await.expect("join");
        assert_eq!((joined.offset, joined.recovered), (0, false));
        for i in 1..=3 {
            let m = h
                .hub
                .publish(key("r1"), UserId::new("alice"), data(i))
                .await
                .expect("publish");
            assert_eq!(m.offset, i);
        }
        let other = h
            .hub
            .publish(key("r2"), UserId::new("alice"), data(9))
            .await
            .expect("publish");
        assert_eq!(other.offset, 1);
        settle(&h, &key("r1")).await;
        let (offsets, presence) = drain(&mut rx);
        assert_eq!(offsets, vec![1, 2, 3], "r2 is not delivered to r1's member");
        assert_eq!(presence, vec![("alice".into(), PresenceStatus::Join)]);
        let (b, _rx) = conn("b", "bob");
        assert_eq!(
            h.hub
                .join(&b, key("r1"), None, true)
                .await
                .expect("join")
                .offset,
            3
        );
    }

    #[tokio::test]
    async fn a_message_replayed_from_history_is_not_delivered_again_when_it_arrives_live() {
        let h = hub(100);
        for i in 1..=3 {
            h.hub
                .publish(key("r"), UserId::new("w"), data(i))
                .await
                .expect("publish");
        }
        let page = h
            .hub
            .history(
                &key("r"),
                HistoryQuery {
                    since: Some(0),
                    before: None,
                    limit: 10,
                },
            )
            .await
            .expect("history");
        let third = page
            .messages
            .iter()
            .find(|m| m.offset == 3)
            .cloned()
            .expect("offset 3 is kept");
        let (a, mut rx) = conn("a", "alice");
        let joined = h
            .hub
            .join(&a, key("r"), Some(1), false)
            .await
            .expect("join");
        assert_eq!((joined.offset, joined.recovered), (3, true));
        // The broker hands offset 3 to this instance only now (a room subscribed a moment
        // before history was read): the member already has it. Off the Redis wire, a message
        // carries no epoch.
        let mut late = (*third).clone();
        late.epoch = "".into();
        h.hub
            .router
            .deliver(Delivery::new(key("r"), Payload::Message(Arc::new(late))))
            .await;
        h.hub
            .publish(key("r"), UserId::new("w"), data(4))
            .await
            .expect("publish");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(drain(&mut rx).0, vec![2, 3, 4], "once each, in order");
    }

    #[tokio::test]
    async fn recovery_replays_exactly_the_gap_and_reports_trimmed_history() {
        let h = hub(5);
        for i in 1..=8 {
            h.hub
                .publish(key("r"), UserId::new("w"), data(i))
                .await
                .expect("publish");
        }
        let (a, mut rx) = conn("a", "alice");
        let joined = h
            .hub
            .join(&a, key("r"), Some(5), false)
            .await
            .expect("join");
        assert_eq!((joined.offset, joined.recovered), (8, true));
        assert_eq!(drain(&mut rx).0, vec![6, 7, 8]);

        let (b, mut rx) = conn("b", "bob");
        let joined = h
            .hub
            .join(&b, key("r"), Some(1), false)
            .await
            .expect("join");
        assert!(!joined.recovered, "offsets 2 and 3 were trimmed");
        assert_eq!(
            drain(&mut rx).0,
            vec![4, 5, 6, 7, 8],
            "what is kept is still replayed"
        );
    }

    #[tokio::test]
    async fn recovery_from_another_epoch_replays_nothing() {
        let h = hub(10);
        for i in 1..=4 {
            h.hub
                .publish(key("e"), UserId::new("w"), data(i))
                .await
                .expect("publish");
        }
        let (a, mut rx) = conn("a", "alice");
        let joined = h
            .hub
            .join_at(&a, key("e"), Some(2), Some("an-earlier-epoch"), false)
            .await
            .expect("join");
        assert_eq!((joined.offset, joined.recovered), (4, false));
        assert!(
            drain(&mut rx).0.is_empty(),
            "offsets 3 and 4 are not the client's 3 and 4"
        );

        let (b, mut rx) = conn("b", "bob");
        let joined = h
            .hub
            .join_at(&b, key("e"), Some(2), Some(&*joined.epoch), false)
            .await
            .expect("join");
        assert!(joined.recovered, "the same epoch recovers");
        assert_eq!(drain(&mut rx).0, vec![3, 4]);
    }

    #[tokio::test]
    async fn presence_is_announced_once_per_user() {
        let h = hub(5);
        let (watch, mut rx) = conn("w", "watcher");
        h.hub
            .join(&watch, key("p"), None, true)
            .await
            .expect("join");
        let (tab1, _r1) = conn("t1", "dana");
        let (tab2, _r2) = conn("t2", "dana");
        h.hub.join(&tab1, key("p"), None, true).await.expect("join");
        h.hub.join(&tab2, key("p"), None, true).await.expect("join");
        assert!(h.hub.leave(&tab1, &key("p"), true).await);
        assert!(h.hub.leave(&tab2, &key("p"), true).await);
        assert!(
            !h.hub.leave(&tab2, &key("p"), true).await,
            "a second leave is a no-op"
        );
        settle(&h, &key("p")).await;
        let statuses = drain(&mut rx).1;
        assert_eq!(
            statuses,
            vec![
                ("watcher".into(), PresenceStatus::Join),
                ("dana".into(), PresenceStatus::Join),
                ("dana".into(), PresenceStatus::Leave)
            ]
        );
        let users = h.hub.presence(&key("p")).await.expect("presence");
        assert_eq!(users, vec![UserId::new("watcher")]);
    }

    #[tokio::test]
    async fn a_full_queue_kicks_the_slow_consumer_only() {
        let h = hub(5);
        let (tx, _rx) = mpsc::channel(1);
        let kick = CancellationToken::new();
        let slow = Arc::new(Conn {
            id: ConnId::new("slow"),
            user: UserId::new("slow"),
            sink: Sink::Queue {
                tx,
                kick: kick.clone(),
            },
        });
        let (fast, mut fast_rx) = conn("fast", "fast");
        h.hub
            .join(&slow, key("q"), None, false)
            .await
            .expect("join");
        h.hub
            .join(&fast, key("q"), None, false)
            .await
            .expect("join");
        for i in 1..=3 {
            h.hub
                .publish(key("q"), UserId::new("w"), data(i))
                .await
                .expect("publish");
        }
        settle(&h, &key("q")).await;
        assert!(kick.is_cancelled(), "the slow consumer is told to go");
        assert_eq!(
            drain(&mut fast_rx).0,
            vec![1, 2, 3],
            "the others get everything"
        );
    }
}
