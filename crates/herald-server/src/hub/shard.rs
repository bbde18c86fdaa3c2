//! One shard of the local room index: a task that owns its rooms and their members, and
//! applies deliveries, joins and leaves in the order they arrive.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use herald_core::{ConnId, Delivery, Namespace, Payload, RoomKey, RoomName, UserId};
use socketioxide::SocketIo;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::members::{Keyed, Members};
use super::{Conn, Outgoing, Queued, Sink, now_ms};
use crate::metrics as m;
use crate::transport::sio;

/// Deliveries held for one recovering connection before its gap is declared lost.
const RECOVERY_BUFFER: usize = 10_000;

pub(super) enum ShardCmd {
    /// Fan a delivery out to the room's local members, but for the excluded connections.
    Deliver(Delivery, Option<Arc<HashSet<ConnId>>>),
    /// Add a member; a recovering one buffers deliveries until it has caught up. Replies
    /// false if it was a member already.
    Join {
        conn: Arc<Conn>,
        key: RoomKey,
        recovering: bool,
        reply: oneshot::Sender<bool>,
    },
    /// Hand a recovering member what it buffered; once nothing is buffered (or `force`),
    /// switch it to live delivery.
    CatchUp {
        conn: ConnId,
        key: RoomKey,
        force: bool,
        /// The last message the member was sent, by epoch and offset.
        replayed: Option<(Arc<str>, u64)>,
        reply: oneshot::Sender<CatchUp>,
    },
    /// Remove a member. Replies whether it was one.
    Leave {
        conn: ConnId,
        key: RoomKey,
        reply: oneshot::Sender<bool>,
    },
    /// List every membership in the namespace: (room, connection, user).
    Members {
        namespace: Namespace,
        reply: oneshot::Sender<Vec<(RoomName, ConnId, UserId)>>,
    },
}

/// What a recovering member receives at each step of catching up.
pub(super) struct CatchUp {
    pub pending: Vec<Arc<Outgoing>>,
    /// The member now receives live deliveries.
    pub live: bool,
    /// Deliveries were discarded because the buffer filled up.
    pub overflowed: bool,
}

struct Member {
    conn: Arc<Conn>,
    /// Deliveries held while the member replays history; `None` once it is live.
    recovering: Option<Vec<Arc<Outgoing>>>,
    overflowed: bool,
    /// Live, but history gave it messages up to this one before the broker handed them to
    /// this instance: they are skipped when they arrive. Cleared by the first message past it.
    floor: Option<(Arc<str>, u64)>,
    /// A Socket.IO member in its socketioxide room, which the room broadcast reaches.
    in_sio_room: bool,
}

impl Keyed for Member {
    fn key(&self) -> &ConnId {
        &self.conn.id
    }
}

impl Member {
    /// Whether `payload` is a message this member already received from history.
    fn replayed(&mut self, payload: &Payload) -> bool {
        let (Some((epoch, offset)), Payload::Message(message)) = (&self.floor, payload) else {
            return false;
        };
        // Messages read off the Redis wire do not carry their epoch (an empty one): their
        // offset is compared on its own.
        let same_epoch = message.epoch.is_empty() || message.epoch == *epoch;
        if same_epoch && message.offset <= *offset {
            return true;
        }
        self.floor = None;
        false
    }

    /// Switches a Socket.IO member to the room broadcast, once its floor is passed. Returns
    /// whether it joined the socketioxide room now.
    fn join_sio_room(&mut self, key: &RoomKey) -> bool {
        if self.in_sio_room || self.recovering.is_some() || self.floor.is_some() {
            return false;
        }
        let Sink::Sio(socket) = &self.conn.sink else {
            return false;
        };
        socket.join(key.room.as_str().to_owned());
        self.in_sio_room = true;
        true
    }
}

#[derive(Default)]
struct LocalRoom {
    members: Members<Member>,
    /// Live Socket.IO members, which one socketioxide room broadcast reaches.
    live_sio: usize,
    /// The last broadcast found a Socket.IO member's buffer full. The broadcast does not say
    /// whose, so the next delivery goes to each socket alone, and those still full then
    /// (they stay behind) are disconnected as slow consumers.
    sio_lagging: bool,
}

pub(super) struct Shard {
    rx: mpsc::Receiver<ShardCmd>,
    rooms: HashMap<RoomKey, LocalRoom>,
    sio: Arc<OnceLock<SocketIo>>,
    /// Handles of the per-delivery metrics, looked up once rather than on every delivery.
    delivered: metrics::Counter,
    latency: metrics::Histogram,
}

impl Shard {
    pub(super) fn new(rx: mpsc::Receiver<ShardCmd>, sio: Arc<OnceLock<SocketIo>>) -> Self {
        Self {
            rx,
            rooms: HashMap::new(),
            sio,
            delivered: metrics::counter!(m::MESSAGES_DELIVERED),
            latency: metrics::histogram!(m::DELIVERY_LATENCY),
        }
    }

    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let cmd = tokio::select! {
                cmd = self.rx.recv() => cmd,
                () = shutdown.cancelled() => None,
            };
            let Some(cmd) = cmd else { break };
            match cmd {
                ShardCmd::Deliver(delivery, excluded) => self.deliver(delivery, excluded).await,
                ShardCmd::Join {
                    conn,
                    key,
                    recovering,
                    reply,
                } => {
                    let _ = reply.send(self.join(conn, key, recovering));
                }
                ShardCmd::CatchUp {
                    conn,
                    key,
                    force,
                    replayed,
                    reply,
                } => {
                    let _ = reply.send(self.catch_up(&conn, &key, force, replayed));
                }
                ShardCmd::Leave { conn, key, reply } => {
                    let _ = reply.send(self.leave(&conn, &key));
                }
                ShardCmd::Members { namespace, reply } => {
                    let _ = reply.send(self.members(&namespace));
                }
            }
        }
    }

    async fn deliver(&mut self, delivery: Delivery, excluded: Option<Arc<HashSet<ConnId>>>) {
        let Some(room) = self.rooms.get_mut(&delivery.key) else {
            return;
        };
        let out = Arc::new(Outgoing::new(delivery.payload));
        let mut delivered = 0u64;
        let mut dropped = 0u64;
        for member in room.members.values_mut() {
            if excluded
                .as_ref()
                .is_some_and(|skip| skip.contains(&member.conn.id))
            {
                continue;
            }
            if let Some(pending) = &mut member.recovering {
                if pending.len() < RECOVERY_BUFFER {
                    pending.push(out.clone());
                } else {
                    member.overflowed = true;
                }
                continue;
            }
            if member.replayed(&out.payload) {
                continue;
            }
            if member.join_sio_room(&delivery.key) {
                room.live_sio += 1;
            } else if let (Sink::Sio(socket), false) = (&member.conn.sink, member.in_sio_room) {
                // Still below its floor for messages: events and presence go to it alone.
                if sio::emit_to(socket, &out.payload).is_ok() {
                    delivered += 1;
                }
            }
            if let Sink::Queue { tx, kick } = &member.conn.sink {
                match tx.try_send(Queued::Delivery(out.clone())) {
                    Ok(()) => delivered += 1,
                    Err(TrySendError::Full(_)) => {
                        // A slow consumer: it is disconnected and recovers by offset.
                        dropped += 1;
                        kick.cancel();
                    }
                    Err(TrySendError::Closed(_)) => {}
                }
            }
        }
        if room.live_sio > 0
            && let Some(io) = self.sio.get()
        {
            if std::mem::take(&mut room.sio_lagging) {
                for member in room.members.values() {
                    let Sink::Sio(socket) = &member.conn.sink else {
                        continue;
                    };
                    let skipped = excluded
                        .as_ref()
                        .is_some_and(|skip| skip.contains(&member.conn.id));
                    if !member.in_sio_room || skipped {
                        continue;
                    }
                    match sio::emit_to(socket, &out.payload) {
                        Ok(()) => delivered += 1,
                        Err(e) if sio::is_full(&e) => {
                            // A slow consumer: it is disconnected and recovers by offset.
                            dropped += 1;
                            sio::kick_slow(socket);
                        }
                        Err(_) => {}
                    }
                }
            } else {
                let failed =
                    sio::emit_room(io, &delivery.key, &delivery.except, &out.payload).await;
                delivered += room.live_sio.saturating_sub(failed) as u64;
                dropped += failed as u64;
                room.sio_lagging = failed > 0;
            }
        }
        self.delivered.increment(delivered);
        if dropped > 0 {
            metrics::counter!(m::MESSAGES_DROPPED, "reason" => "slow_consumer").increment(dropped);
        }
        if let Payload::Message(message) = &out.payload {
            let age_ms = (now_ms() - message.ts).max(0) as u64;
            self.latency
                .record(Duration::from_millis(age_ms).as_secs_f64());
        }
    }

    fn join(&mut self, conn: Arc<Conn>, key: RoomKey, recovering: bool) -> bool {
        let room = self.rooms.entry(key.clone()).or_insert_with(|| {
            metrics::gauge!(m::ROOMS).increment(1);
            LocalRoom::default()
        });
        if room.members.contains_key(&conn.id) {
            return false;
        }
        let mut member = Member {
            conn: conn.clone(),
            recovering: recovering.then(Vec::new),
            overflowed: false,
            floor: None,
            in_sio_room: false,
        };
        if member.join_sio_room(&key) {
            room.live_sio += 1;
        }
        room.members.insert(member)
    }

    fn catch_up(
        &mut self,
        conn: &ConnId,
        key: &RoomKey,
        force: bool,
        replayed: Option<(Arc<str>, u64)>,
    ) -> CatchUp {
        let gone = CatchUp {
            pending: Vec::new(),
            live: true,
            overflowed: false,
        };
        let Some(room) = self.rooms.get_mut(key) else {
            return gone;
        };
        let Some(member) = room.members.get_mut(conn) else {
            return gone;
        };
        let Some(pending) = member.recovering.as_mut() else {
            return gone;
        };
        let overflowed = std::mem::take(&mut member.overflowed);
        // Given up: what is buffered is dropped rather than sent behind live deliveries, so the
        // client sees a gap in offsets (and `recovered: false`), never a reordering.
        let pending = if force {
            Vec::new()
        } else {
            std::mem::take(pending)
        };
        if force || pending.is_empty() {
            member.recovering = None;
            if !force {
                member.floor = replayed.filter(|(_, offset)| *offset > 0);
            }
            if member.join_sio_room(key) {
                room.live_sio += 1;
            }
            return CatchUp {
                pending,
                live: true,
                overflowed,
            };
        }
        CatchUp {
            pending,
            live: false,
            overflowed,
        }
    }

    fn leave(&mut self, conn: &ConnId, key: &RoomKey) -> bool {
        let Some(room) = self.rooms.get_mut(key) else {
            return false;
        };
        let Some(member) = room.members.remove(conn) else {
            return false;
        };
        if let (Sink::Sio(socket), true) = (&member.conn.sink, member.in_sio_room) {
            socket.leave(key.room.as_str().to_owned());
            room.live_sio -= 1;
        }
        if room.members.is_empty() {
            self.rooms.remove(key);
            metrics::gauge!(m::ROOMS).decrement(1);
        }
        true
    }
}

impl Shard {
    fn members(&self, namespace: &Namespace) -> Vec<(RoomName, ConnId, UserId)> {
        self.rooms
            .iter()
            .filter(|(key, _)| key.namespace == *namespace)
            .flat_map(|(key, room)| {
                room.members
                    .values()
                    .map(|m| (key.room.clone(), m.conn.id.clone(), m.conn.user.clone()))
            })
            .collect()
    }
}
