//! Presence shared by the fleet: per room, each connection with its user and an expiry that
//! its instance's heartbeat pushes forward, so a dead instance's users leave on their own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use herald_core::memory::MemoryPresence;
use herald_core::{
    BoxFuture, Broker, ConnId, Namespace, Presence, PresenceChange, PresenceError, PresenceStatus,
    RoomKey, RoomName, UserId,
};
use redis::aio::ConnectionManager;

use crate::broker::RedisBroker;
use crate::{RedisSettings, metric, now_ms};

/// Adds or refreshes a connection. KEYS: conns hash, expiry zset, users hash, rooms zset.
/// ARGV: conn, user, expiry (unix ms), room id. Returns 1 when the user arrived.
const UPSERT: &str = r#"
local arrived = 0
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  if redis.call('HINCRBY', KEYS[3], ARGV[2], 1) == 1 then arrived = 1 end
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[4])
return arrived
"#;

/// Removes one connection, or every expired one when ARGV[1] is empty (ARGV[2]: now, ms).
/// KEYS: conns hash, expiry zset, users hash. Returns the users who left.
const REMOVE: &str = r#"
local conns
if ARGV[1] == '' then
  conns = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
else
  conns = {ARGV[1]}
end
local left = {}
for _, conn in ipairs(conns) do
  local user = redis.call('HGET', KEYS[1], conn)
  redis.call('ZREM', KEYS[2], conn)
  if user then
    redis.call('HDEL', KEYS[1], conn)
    if redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
      redis.call('HDEL', KEYS[3], user)
      table.insert(left, user)
    end
  end
end
return left
"#;

/// Presence in Redis, with in-memory presence standing in while Redis is away.
///
/// ## Expiry
/// Every entry expires `presence_ttl` after its last heartbeat (sent every third of it). Each
/// instance sweeps expired entries; the Lua step that removes an entry reports the user's
/// departure to exactly one sweeper, which announces it to the room.
pub struct RedisPresence {
    inner: Arc<Inner>,
}

struct Inner {
    settings: RedisSettings,
    broker: Arc<RedisBroker>,
    upsert: redis::Script,
    remove: redis::Script,
    fallback: MemoryPresence,
    /// This instance's entries, re-sent by each heartbeat.
    local: Mutex<HashMap<(RoomKey, ConnId), UserId>>,
    /// Serializes the Redis step and the `local` update of one connection's entries, so a
    /// heartbeat never re-creates an entry being removed, nor takes an arrival from `add`.
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl RedisPresence {
    /// Starts presence on the broker's connection, with its heartbeat and sweeper.
    pub fn start(settings: RedisSettings, broker: Arc<RedisBroker>) -> Self {
        let inner = Arc::new(Inner {
            settings,
            broker,
            upsert: redis::Script::new(UPSERT),
            remove: redis::Script::new(REMOVE),
            fallback: MemoryPresence::new(),
            local: Mutex::new(HashMap::new()),
            stripes: (0..32).map(|_| tokio::sync::Mutex::new(())).collect(),
        });
        tokio::spawn(heartbeat(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Removes every entry of this instance at once (a clean shutdown).
    pub async fn clear(&self) {
        let entries: Vec<_> = self
            .inner
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        let Some(mut conn) = self.inner.broker.command_connection() else {
            return;
        };
        for ((key, conn_id), user) in entries {
            if let Ok(left) = self.inner.remove_entry(&mut conn, &key, &conn_id).await {
                for user in left.into_iter().filter(|u| u == user.as_str()) {
                    self.inner.announce_leave(&key, UserId::new(user)).await;
                }
            }
        }
    }
}

impl Inner {
    fn stripe(&self, conn: &ConnId) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        conn.hash(&mut hasher);
        &self.stripes[hasher.finish() as usize % self.stripes.len()]
    }

    fn is_local(&self, key: &RoomKey, conn: &ConnId) -> bool {
        self.local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&(key.clone(), conn.clone()))
    }

    /// conns hash, expiry zset, users hash (one hash tag per room), and the rooms index.
    fn keys(&self, key: &RoomKey) -> [String; 4] {
        let tag = format!(
            "herald:{{{}#{}#{}}}",
            self.settings.key, key.namespace, key.room
        );
        [
            format!("{tag}:presence"),
            format!("{tag}:presence-expiry"),
            format!("{tag}:presence-users"),
            format!("herald:{}:presence-rooms", self.settings.key),
        ]
    }

    fn expiry(&self) -> i64 {
        now_ms() + i64::try_from(self.settings.presence_ttl.as_millis()).unwrap_or(i64::MAX / 2)
    }

    async fn upsert(
        &self,
        conn: &mut ConnectionManager,
        key: &RoomKey,
        id: &ConnId,
        user: &UserId,
    ) -> redis::RedisResult<bool> {
        let keys = self.keys(key);
        let arrived: i64 = self
            .upsert
            .key(&keys[0])
            .key(&keys[1])
            .key(&keys[2])
            .key(&keys[3])
            .arg(id.as_str())
            .arg(user.as_str())
            .arg(self.expiry())
            .arg(format!("{}#{}", key.namespace, key.room))
            .invoke_async(conn)
            .await?;
        Ok(arrived == 1)
    }

    /// Removes one connection's entry; returns the users who left the room (at most one).
    async fn remove_entry(
        &self,
        conn: &mut ConnectionManager,
        key: &RoomKey,
        id: &ConnId,
    ) -> redis::RedisResult<Vec<String>> {
        let keys = self.keys(key);
        self.remove
            .key(&keys[0])
            .key(&keys[1])
            .key(&keys[2])
            .arg(id.as_str())
            .arg(0)
            .invoke_async(conn)
            .await
    }

    async fn announce_leave(&self, key: &RoomKey, user: UserId) {
        let change = PresenceChange {
            room: key.room.clone(),
            user,
            status: PresenceStatus::Leave,
        };
        if let Err(e) = self.broker.publish_presence(key.clone(), change).await {
            tracing::warn!(room = %key, error = %e, "presence leave announcement failed");
        }
    }

    /// Removes expired entries everywhere and announces the users who left.
    async fn sweep(&self, conn: &mut ConnectionManager) -> redis::RedisResult<()> {
        let index = format!("herald:{}:presence-rooms", self.settings.key);
        let rooms: Vec<String> = redis::cmd("ZRANGE")
            .arg(&index)
            .arg(0)
            .arg(-1)
            .query_async(conn)
            .await?;
        for id in rooms {
            let Some((namespace, room)) = id.rsplit_once('#') else {
                continue;
            };
            let Ok(room) = RoomName::new(room) else {
                continue;
            };
            let key = RoomKey::new(Namespace::new(namespace), room);
            let keys = self.keys(&key);
            let left: Vec<String> = self
                .remove
                .key(&keys[0])
                .key(&keys[1])
                .key(&keys[2])
                .arg("")
                .arg(now_ms())
                .invoke_async(conn)
                .await?;
            metrics::counter!(metric::PRESENCE_EXPIRED).increment(left.len() as u64);
            for user in left {
                tracing::info!(room = %key, user, "presence expired");
                self.announce_leave(&key, UserId::new(user)).await;
            }
            // A room whose entries are all gone leaves the index.
            let remaining: u64 = redis::cmd("ZCARD").arg(&keys[1]).query_async(conn).await?;
            if remaining == 0 {
                redis::cmd("ZREM")
                    .arg(&index)
                    .arg(&id)
                    .exec_async(conn)
                    .await?;
            }
        }
        Ok(())
    }
}

async fn heartbeat(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(inner) => (inner.settings.presence_ttl / 3).max(Duration::from_millis(100)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let Some(mut conn) = inner.broker.command_connection() else {
            continue;
        };
        let entries: Vec<_> = inner
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((k, c), u)| (k.clone(), c.clone(), u.clone()))
            .collect();
        metrics::gauge!(metric::PRESENCE_ENTRIES).set(entries.len() as f64);
        for (key, id, user) in entries {
            let _entry = inner.stripe(&id).lock().await;
            if !inner.is_local(&key, &id) {
                continue;
            }
            if let Err(e) = inner.upsert(&mut conn, &key, &id, &user).await {
                tracing::debug!(error = %e, "presence heartbeat failed");
                break;
            }
        }
        if let Err(e) = inner.sweep(&mut conn).await {
            tracing::debug!(error = %e, "presence sweep failed");
        }
    }
}

impl Presence for RedisPresence {
    fn add(
        &self,
        key: &RoomKey,
        user: &UserId,
        conn: &ConnId,
    ) -> BoxFuture<'_, Result<bool, PresenceError>> {
        let (key, user, id) = (key.clone(), user.clone(), conn.clone());
        Box::pin(async move {
            let _entry = self.inner.stripe(&id).lock().await;
            let arrived = match self.inner.broker.command_connection() {
                Some(mut conn) => self
                    .inner
                    .upsert(&mut conn, &key, &id, &user)
                    .await
                    .map_err(unavailable),
                None => self.inner.fallback.add(&key, &user, &id).await,
            };
            self.inner
                .local
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert((key, id), user);
            arrived
        })
    }

    fn remove(
        &self,
        key: &RoomKey,
        user: &UserId,
        conn: &ConnId,
    ) -> BoxFuture<'_, Result<bool, PresenceError>> {
        let (key, user, id) = (key.clone(), user.clone(), conn.clone());
        Box::pin(async move {
            let _entry = self.inner.stripe(&id).lock().await;
            self.inner
                .local
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(key.clone(), id.clone()));
            let fallback = self.inner.fallback.remove(&key, &user, &id).await;
            match self.inner.broker.command_connection() {
                Some(mut conn) => {
                    let left = self
                        .inner
                        .remove_entry(&mut conn, &key, &id)
                        .await
                        .map_err(unavailable)?;
                    Ok(left.iter().any(|u| u == user.as_str()))
                }
                None => fallback,
            }
        })
    }

    fn users(&self, key: &RoomKey) -> BoxFuture<'_, Result<Vec<UserId>, PresenceError>> {
        let key = key.clone();
        Box::pin(async move {
            match self.inner.broker.command_connection() {
                Some(mut conn) => {
                    let keys = self.inner.keys(&key);
                    let mut users: Vec<String> = redis::cmd("HKEYS")
                        .arg(&keys[2])
                        .query_async(&mut conn)
                        .await
                        .map_err(unavailable)?;
                    users.sort_unstable();
                    Ok(users.into_iter().map(UserId::new).collect())
                }
                None => self.inner.fallback.users(&key).await,
            }
        })
    }
}

fn unavailable(e: redis::RedisError) -> PresenceError {
    metrics::counter!(metric::REDIS_ERRORS).increment(1);
    PresenceError::Unavailable(e.to_string())
}
