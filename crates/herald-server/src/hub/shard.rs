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
}

#[derive(Default)]
struct LocalRoom {
    members: HashMap<ConnId, Member>,
    /// Live Socket.IO members, which one socketioxide room broadcast reaches.
    live_sio: usize,
}

pub(super) struct Shard {
    rx: mpsc::Receiver<ShardCmd>,
    rooms: HashMap<RoomKey, LocalRoom>,
    sio: Arc<OnceLock<SocketIo>>,
}

impl Shard {
    pub(super) fn new(rx: mpsc::Receiver<ShardCmd>, sio: Arc<OnceLock<SocketIo>>) -> Self {
        Self {
            rx,
            rooms: HashMap::new(),
            sio,
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
                    reply,
                } => {
                    let _ = reply.send(self.catch_up(&conn, &key, force));
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
            let failed = sio::emit_room(io, &delivery.key, &delivery.except, &out.payload).await;
            delivered += room.live_sio.saturating_sub(failed) as u64;
            dropped += failed as u64;
        }
        metrics::counter!(m::MESSAGES_DELIVERED).increment(delivered);
        if dropped > 0 {
            metrics::counter!(m::MESSAGES_DROPPED, "reason" => "slow_consumer").increment(dropped);
        }
        if let Payload::Message(message) = &out.payload {
            let age_ms = (now_ms() - message.ts).max(0) as u64;
            metrics::histogram!(m::DELIVERY_LATENCY)
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
        if !recovering {
            go_live(room, &conn, &key);
        }
        let member = Member {
            conn: conn.clone(),
            recovering: recovering.then(Vec::new),
            overflowed: false,
        };
        room.members.insert(conn.id.clone(), member);
        true
    }

    fn catch_up(&mut self, conn: &ConnId, key: &RoomKey, force: bool) -> CatchUp {
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
            let conn = member.conn.clone();
            go_live(room, &conn, key);
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
        if let (Sink::Sio(socket), None) = (&member.conn.sink, &member.recovering) {
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

fn go_live(room: &mut LocalRoom, conn: &Conn, key: &RoomKey) {
    if let Sink::Sio(socket) = &conn.sink {
        socket.join(key.room.as_str().to_owned());
        room.live_sio += 1;
    }
}
