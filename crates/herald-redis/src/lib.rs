//! herald's Redis engines, for running many instances as one fleet.
//!
//! # Layout
//!
//! - [`codec`]: the wire format of Node's `@socket.io/redis-adapter` v8: channel names,
//!   msgpack broadcasts, request types.
//! - [`broker`]: [`RedisBroker`], per-room offsets and history from one Lua step, fan-out over
//!   per-room channels, gap repair, and single-instance service while Redis is away.
//! - [`request`]: answers to other servers' requests (`fetchSockets`, `socketsJoin`…).
//! - [`persist`]: [`RedisQueue`], the persist stream workers read in a consumer group.
//! - [`presence`]: [`RedisPresence`], presence shared by the fleet, with entries that expire
//!   when an instance dies.

pub mod broker;
pub mod codec;
pub mod persist;
pub mod presence;
pub mod request;

use std::time::Duration;

pub use broker::RedisBroker;
use herald_core::Namespace;
pub use persist::RedisQueue;
pub use presence::RedisPresence;

/// How to reach Redis and how to lay out herald's keys in it.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` (TLS) URL.
    pub url: String,
    /// Overrides the URL's password (`REDIS_PASSWORD`).
    pub password: Option<String>,
    /// Channel and key prefix (`HERALD_REDIS_KEY`), the adapter's `key` option.
    pub key: String,
    pub namespaces: Vec<Namespace>,
    /// Messages kept per room in its history stream.
    pub history_size: usize,
    /// How long an idle room's offset and history live.
    pub history_ttl: Duration,
    /// How long a presence entry lives without a heartbeat.
    pub presence_ttl: Duration,
    /// This server's uid on the wire.
    pub uid: String,
    /// How often the pub/sub connection is probed for liveness (see [`broker::RedisBroker`]).
    pub probe_interval: Duration,
}

impl RedisSettings {
    pub(crate) fn client(&self) -> redis::RedisResult<redis::Client> {
        let mut info: redis::ConnectionInfo =
            redis::IntoConnectionInfo::into_connection_info(self.url.as_str())?;
        if let Some(password) = &self.password {
            let redis = info.redis_settings().clone().set_password(password.clone());
            info = info.set_redis_settings(redis);
        }
        redis::Client::open(info)
    }

    /// The URL without its password, for logs.
    pub fn redacted_url(&self) -> String {
        herald_core::redact::redact_url(&self.url)
    }
}

/// Metric names for the Redis engines.
pub mod metric {
    pub const BROKER_PUBLISHES: &str = "herald_broker_publishes_total";
    pub const BROKER_RECEIVES: &str = "herald_broker_receives_total";
    /// Broadcasts and requests off Redis that could not be read (label `kind`: namespace,
    /// room or request), and were ignored.
    pub const BROKER_DECODE_ERRORS: &str = "herald_broker_decode_errors_total";
    pub const BROKER_PUBLISH_SECONDS: &str = "herald_broker_publish_seconds";
    pub const BROKER_LATENCY: &str = "herald_cross_instance_latency_seconds";
    pub const REDIS_ERRORS: &str = "herald_redis_errors_total";
    pub const REDIS_RECONNECTS: &str = "herald_redis_reconnects_total";
    /// Pub/sub connections found dead by the liveness probe (and so replaced).
    pub const PUBSUB_PROBE_FAILURES: &str = "herald_redis_pubsub_probe_failures_total";
    pub const GAPS_REPAIRED: &str = "herald_gap_messages_repaired_total";
    pub const PRESENCE_ENTRIES: &str = "herald_presence_entries";
    pub const PRESENCE_EXPIRED: &str = "herald_presence_expired_total";
}

/// The current time in unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
