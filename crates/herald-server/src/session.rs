//! A client session, whatever its transport: the rooms it is in, and what each command does.

use std::collections::HashSet;
use std::sync::Arc;

use herald_core::{Namespace, RoomKey, RoomName, UserId};
use serde_json::{Value, json};

use crate::auth::Identity;
use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::Config;

use crate::hub::{Conn, Control, Hub, Joined};
use crate::mailbox;
use crate::metrics as m;
use crate::protocol::{ClientError, Command, ErrorCode, ok_ack};

/// One connection's view of the hub. Commands run one at a time, in the order they arrived.
pub struct Session {
    hub: Arc<Hub>,
    conn: Arc<Conn>,
    namespace: Namespace,
    identity: Identity,
    /// Rooms the client joined (and its personal room), which it may publish to.
    rooms: HashSet<RoomName>,
    /// Rooms the server keeps the connection in: its namespace's everyone room and its id.
    internal: Vec<RoomName>,
    policy: Arc<Policy>,
    /// This connection's event rate, when limited.
    limiter: Option<DefaultDirectRateLimiter>,
    control: Option<mailbox::Receiver<Control>>,
}

/// The limits every session of this instance follows.
pub struct Policy {
    pub max_payload: usize,
    /// Rooms a connection may join beyond its personal room; 0 is unlimited.
    max_rooms: usize,
    event_rate: u32,
    per_connection: Option<Quota>,
    per_user: Option<DefaultKeyedRateLimiter<UserId>>,
    user_event_rate: u32,
}

impl Policy {
    pub fn new(config: &Config) -> Self {
        // A limit allows bursts of twice its rate per second.
        let quota = |rate: u32| {
            let burst = |r: NonZeroU32| r.saturating_mul(NonZeroU32::MIN.saturating_add(1));
            NonZeroU32::new(rate).map(|r| Quota::per_second(r).allow_burst(burst(r)))
        };
        Self {
            max_payload: config.max_payload,
            max_rooms: config.max_rooms,
            event_rate: config.event_rate,
            per_connection: quota(config.event_rate),
            per_user: quota(config.user_event_rate).map(RateLimiter::keyed),
            user_event_rate: config.user_event_rate,
        }
    }

    /// Drops the per-user limiter's idle users, which it would otherwise keep forever.
    pub fn retain_recent(&self) {
        if let Some(users) = &self.per_user {
            users.retain_recent();
            users.shrink_to_fit();
        }
    }
}

impl Session {
    /// Opens the session: the connection joins its personal room `user:<sub>` and its
    /// namespace's everyone room, and registers for remote control.
    pub async fn open(
        hub: Arc<Hub>,
        conn: Arc<Conn>,
        namespace: Namespace,
        identity: Identity,
        policy: Arc<Policy>,
    ) -> Result<Self, ClientError> {
        let control = hub.register(&conn.id);
        let mut session = Self {
            hub,
            conn,
            namespace,
            identity,
            rooms: HashSet::new(),
            internal: Vec::new(),
            limiter: policy.per_connection.map(RateLimiter::direct),
            policy,
            control: Some(control),
        };
        // The everyone room takes namespace-wide broadcasts. The connection's own id is a room
        // too, as a Socket.IO socket's is, so other servers can address it (`io.to(sid)`).
        let own = RoomName::new(session.conn.id.as_str()).ok();
        session.internal = [Some(RoomName::everyone()), own]
            .into_iter()
            .flatten()
            .collect();
        let personal = RoomName::personal(&session.identity.user);
        let rooms: Vec<RoomName> = session
            .internal
            .iter()
            .chain([&personal])
            .cloned()
            .collect();
        for room in rooms {
            let joined = session
                .hub
                .join(&session.conn, session.key(&room), None, false)
                .await;
            if let Err(e) = joined {
                session.close().await;
                return Err(e);
            }
        }
        session.rooms.insert(personal);
        Ok(session)
    }

    /// What other servers ask of this session; taken once by the transport's loop.
    pub fn take_control(&mut self) -> mailbox::Receiver<Control> {
        self.control
            .take()
            .unwrap_or_else(|| mailbox::unbounded().1)
    }

    /// Applies a request from another server. Returns false when the session must end.
    pub async fn apply(&mut self, control: Control) -> bool {
        let result = match control {
            Control::Join(room) => self.join_room(room, None, None).await.map(drop),
            Control::Leave(room) => {
                self.leave_room(&room).await;
                Ok(())
            }
            Control::Disconnect => return false,
        };
        if let Err(e) = result {
            tracing::warn!(conn = %self.conn.id, error = %e, "remote join failed");
        }
        true
    }

    /// The `session` event: `{sid, user, instance}`.
    pub fn describe(&self) -> Value {
        json!({
            "sid": self.conn.id.as_str(),
            "user": self.identity.user.as_str(),
            "instance": self.hub.instance(),
        })
    }

    /// Runs the client event `event` and returns its ack.
    pub async fn handle(&mut self, event: &str, payload: Value) -> Value {
        let result = match self.check_rate() {
            Ok(()) => match Command::parse(event, payload, self.policy.max_payload) {
                Ok(command) => self.run(command).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        result.unwrap_or_else(|e| {
            metrics::counter!(m::EVENTS_REJECTED, "error" => e.code.as_str()).increment(1);
            tracing::debug!(conn = %self.conn.id, user = %self.identity.user, event, error = %e, "event refused");
            e.to_ack()
        })
    }

    fn check_rate(&self) -> Result<(), ClientError> {
        if self.limiter.as_ref().is_some_and(|l| l.check().is_err()) {
            metrics::counter!(m::RATE_LIMITED, "scope" => "connection").increment(1);
            let limit = self.policy.event_rate;
            return Err(ClientError::new(
                ErrorCode::RateLimited,
                format!("more than {limit} events/s on this connection"),
            ));
        }
        if let Some(users) = &self.policy.per_user
            && users.check_key(&self.identity.user).is_err()
        {
            metrics::counter!(m::RATE_LIMITED, "scope" => "user").increment(1);
            let limit = self.policy.user_event_rate;
            return Err(ClientError::new(
                ErrorCode::RateLimited,
                format!("more than {limit} events/s for this user"),
            ));
        }
        Ok(())
    }

    async fn run(&mut self, command: Command) -> Result<Value, ClientError> {
        match command {
            Command::Join { room, since, epoch } => {
                self.check_may_join(&room)?;
                self.check_room_count(&room)?;
                let joined = self.join_room(room.clone(), since, epoch).await?;
                Ok(ok_ack(json!({
                    "room": room,
                    "offset": joined.offset,
                    "epoch": &*joined.epoch,
                    "recovered": joined.recovered,
                })))
            }
            Command::Leave { room } => {
                self.leave_room(&room).await;
                Ok(ok_ack(json!({ "room": room })))
            }
            Command::Message { room, data } => {
                if !self.rooms.contains(&room) {
                    return Err(ClientError::new(
                        ErrorCode::NotMember,
                        format!("join {room} before publishing to it"),
                    ));
                }
                let key = self.key(&room);
                let message = self
                    .hub
                    .publish(key, self.identity.user.clone(), data)
                    .await?;
                Ok(ok_ack(
                    json!({ "id": message.id, "offset": message.offset, "epoch": &*message.epoch }),
                ))
            }
            Command::Presence { room } => {
                self.check_may_join(&room)?;
                let users = self.hub.presence(&self.key(&room)).await?;
                Ok(ok_ack(json!({ "room": room, "users": users })))
            }
            Command::History { room, query, epoch } => {
                self.check_may_join(&room)?;
                let page = self
                    .hub
                    .history_in(&self.key(&room), epoch.as_deref(), query)
                    .await?;
                Ok(ok_ack(json!({
                    "room": room,
                    "messages": page.messages,
                    "offset": page.position.offset,
                    "epoch": &*page.position.epoch,
                })))
            }
        }
    }

    async fn join_room(
        &mut self,
        room: RoomName,
        since: Option<u64>,
        epoch: Option<String>,
    ) -> Result<Joined, ClientError> {
        let key = self.key(&room);
        let joined = self
            .hub
            .join_at(
                &self.conn,
                key,
                since,
                epoch.as_deref(),
                tracks_presence(&room),
            )
            .await?;
        self.rooms.insert(room);
        Ok(joined)
    }

    async fn leave_room(&mut self, room: &RoomName) {
        if self.rooms.remove(room) {
            self.hub
                .leave(&self.conn, &self.key(room), tracks_presence(room))
                .await;
        }
    }

    /// A connection's own personal room does not count against `HERALD_MAX_ROOMS`.
    fn check_room_count(&self, room: &RoomName) -> Result<(), ClientError> {
        let max = self.policy.max_rooms;
        let joined = self.rooms.len().saturating_sub(1);
        if max == 0 || self.rooms.contains(room) || joined < max {
            return Ok(());
        }
        Err(ClientError::new(
            ErrorCode::TooManyRooms,
            format!("a connection may join at most {max} rooms; leave one first"),
        ))
    }

    fn check_may_join(&self, room: &RoomName) -> Result<(), ClientError> {
        if self.identity.may_join(room) {
            Ok(())
        } else {
            Err(ClientError::new(
                ErrorCode::Forbidden,
                format!("not allowed to join {room}"),
            ))
        }
    }

    fn key(&self, room: &RoomName) -> RoomKey {
        RoomKey::new(self.namespace.clone(), room.clone())
    }

    /// Ends the session: the connection leaves every room, and the user's presence goes with
    /// it where this was their last connection.
    pub async fn close(mut self) {
        self.hub.deregister(&self.conn.id);
        for room in std::mem::take(&mut self.rooms) {
            self.hub
                .leave(&self.conn, &self.key(&room), tracks_presence(&room))
                .await;
        }
        for room in std::mem::take(&mut self.internal) {
            self.hub.leave(&self.conn, &self.key(&room), false).await;
        }
    }
}

/// Presence is tracked in the rooms users choose, not in personal rooms.
fn tracks_presence(room: &RoomName) -> bool {
    room.owner().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_users_are_pruned_from_the_user_limiter() {
        let policy = Policy::new(&Config {
            user_event_rate: 1000,
            ..Config::default()
        });
        let users = policy.per_user.as_ref().expect("limited");
        for i in 0..20 {
            assert!(users.check_key(&UserId::new(format!("u{i}"))).is_ok());
        }
        assert_eq!(users.len(), 20);
        std::thread::sleep(std::time::Duration::from_millis(20));
        policy.retain_recent();
        assert_eq!(users.len(), 0, "idle users are forgotten");
    }
}
