//! Admission at connect, shared by both transports: the per-IP connection rate, the
//! connection caps per instance and per user, and the client address behind trusted proxies.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use herald_core::UserId;
use ipnet::{IpNet, Ipv4Net};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::AppState;
use crate::config::Config;
use crate::metrics as m;

/// How often idle keys are dropped from the keyed rate limiters, so that a stream of
/// one-time addresses or users cannot grow them without bound.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Why a connection was refused at the door. The code is what clients see: the JSON `error`
/// of a refused `/ws` upgrade, and the `connect_error` message of Socket.IO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Too many new connections from one address (`HERALD_IP_CONNECT_RATE`).
    #[error("rate_limited")]
    RateLimited,
    /// This instance holds `HERALD_MAX_CONNECTIONS` already.
    #[error("server_full")]
    ServerFull,
    /// The user holds `HERALD_MAX_USER_CONNECTIONS` on this instance already.
    #[error("too_many_connections")]
    TooManyConnections,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::RateLimited => "rate_limited",
            Refusal::ServerFull => "server_full",
            Refusal::TooManyConnections => "too_many_connections",
        }
    }

    /// The HTTP status of a refused `/ws` upgrade: 503 when this instance is full (another
    /// instance may have room), 429 when the client itself asks too much.
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::ServerFull => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::RateLimited | Refusal::TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn message(self, limits: &Limits) -> String {
        match self {
            Refusal::RateLimited => format!(
                "more than {} new connections/s from this address",
                limits.ip_connect_rate
            ),
            Refusal::ServerFull => format!(
                "this instance holds its maximum of {} connections",
                limits.max_connections
            ),
            Refusal::TooManyConnections => format!(
                "this user holds its maximum of {} connections here",
                limits.max_user_connections
            ),
        }
    }

    /// Counts the refusal in `herald_connections_refused_total{reason, transport}`.
    pub fn count(self, transport: &'static str) {
        metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => self.code(), "transport" => transport)
            .increment(1);
    }
}

/// Counts one arrival from `ip` against `limiter`, if there is one; a refusal is counted in
/// `herald_rate_limited_total{scope}`.
fn counted(
    limiter: Option<&DefaultKeyedRateLimiter<IpAddr>>,
    ip: Option<IpAddr>,
    scope: &'static str,
) -> Result<(), Refusal> {
    match (limiter, ip) {
        (Some(limiter), Some(ip)) if limiter.check_key(&ip).is_err() => {
            metrics::counter!(m::RATE_LIMITED, "scope" => scope).increment(1);
            Err(Refusal::RateLimited)
        }
        _ => Ok(()),
    }
}

/// The admission limits of this instance.
pub struct Limits {
    ip_connect_rate: u32,
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// New Engine.IO sessions per address; see [`Limits::check_handshake`].
    per_ip_handshake: Option<DefaultKeyedRateLimiter<IpAddr>>,
    max_connections: usize,
    instance: Option<Arc<Semaphore>>,
    max_user_connections: usize,
    per_user: Arc<Mutex<HashMap<UserId, usize>>>,
    trusted_proxies: Vec<IpRange>,
}

/// What an admitted connection holds for as long as it is open: its share of the instance
/// and of its user's connections.
pub struct Admission {
    _permit: Option<OwnedSemaphorePermit>,
    _user: Option<UserSlot>,
}

struct UserSlot {
    counts: Arc<Mutex<HashMap<UserId, usize>>>,
    user: UserId,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

impl Limits {
    pub fn new(config: &Config) -> Self {
        // Like event rates, a connection rate allows bursts of twice its rate per second.
        let keyed = |rate: u32| {
            NonZeroU32::new(rate).map(|rate| {
                let burst = rate.saturating_mul(NonZeroU32::MIN.saturating_add(1));
                RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
            })
        };
        Self {
            ip_connect_rate: config.ip_connect_rate,
            per_ip: keyed(config.ip_connect_rate),
            per_ip_handshake: keyed(config.ip_connect_rate.saturating_mul(2)),
            max_connections: config.max_connections,
            // A semaphore, as in mini-redis: one permit per open connection.
            instance: (config.max_connections > 0)
                .then(|| Arc::new(Semaphore::new(config.max_connections))),
            max_user_connections: config.max_user_connections,
            per_user: Arc::default(),
            trusted_proxies: config.trusted_proxies.clone(),
        }
    }

    /// Counts one new connection from `ip` against its rate. Checked before the token, so a
    /// flood of handshakes costs no signature checks.
    pub fn check_ip(&self, ip: Option<IpAddr>) -> Result<(), Refusal> {
        counted(self.per_ip.as_ref(), ip, "ip")
    }

    /// Counts one new Engine.IO session from `ip`, at twice the connection rate. A Socket.IO
    /// client opens its session before it connects a namespace, and only the connect is
    /// counted by [`Limits::check_ip`] (where a refusal reaches the client as a readable
    /// `connect_error`); without this, a flood of bare handshakes that never connect would be
    /// limited by nothing, each holding a session until its ping timeout. Twice the rate, so
    /// that a client within its connection rate never meets this one first.
    pub fn check_handshake(&self, ip: Option<IpAddr>) -> Result<(), Refusal> {
        counted(self.per_ip_handshake.as_ref(), ip, "ip_handshake")
    }

    /// Takes a place for one more connection of `user`, if this instance and the user have
    /// room for it.
    pub fn admit(&self, user: &UserId) -> Result<Admission, Refusal> {
        let permit = match &self.instance {
            Some(semaphore) => Some(
                semaphore
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| Refusal::ServerFull)?,
            ),
            None => None,
        };
        let slot = match self.max_user_connections {
            0 => None,
            max => {
                let mut counts = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
                let n = counts.entry(user.clone()).or_insert(0);
                if *n >= max {
                    return Err(Refusal::TooManyConnections);
                }
                *n += 1;
                Some(UserSlot {
                    counts: self.per_user.clone(),
                    user: user.clone(),
                })
            }
        };
        Ok(Admission {
            _permit: permit,
            _user: slot,
        })
    }

    /// The client's address: the peer's, or, when the peer is a trusted proxy, the nearest
    /// untrusted address in `X-Forwarded-For` (or `X-Real-IP`). Headers from any other peer
    /// are ignored, since anyone can write them.
    pub fn client_ip(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = canonical(peer?.ip());
        if !self.trusts(peer) {
            return Some(peer);
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        if hops.is_empty() {
            return Some(
                headers
                    .get("x-real-ip")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok())
                    .map_or(peer, canonical),
            );
        }
        // Right to left: each hop was added by the proxy after it; stop at the first address
        // no trusted proxy stands for, or at anything unreadable.
        for hop in hops.iter().rev() {
            match hop.parse::<IpAddr>() {
                Ok(ip) => {
                    client = canonical(ip);
                    if !self.trusts(client) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        Some(client)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|range| range.contains(ip))
    }

    /// Drops idle keys from the keyed limiters.
    pub fn retain_recent(&self) {
        if let Some(limiter) = &self.per_ip_handshake {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some(limiter) = &self.per_ip {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// Prunes the keyed rate limiters (per IP, per user) every minute, for as long as the server
/// lives.
pub async fn prune(state: Weak<AppState>) {
    let mut every = tokio::time::interval(PRUNE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let Some(state) = state.upgrade() else {
            return;
        };
        state.limits.retain_recent();
        state.policy.retain_recent();
    }
}

/// Aborts the connection once data sent to the peer stays unacknowledged for `timeout`, as
/// when a client stops reading and its receive window stays shut. herald's own `/ws` writer
/// gives up on such a peer by itself; socketioxide's websocket writer would wait on it
/// forever, holding the socket's buffer, so the kernel ends it instead.
///
/// Set on the listener, it holds for every socket accepted from it.
#[cfg_attr(not(target_os = "linux"), allow(unused_variables))]
pub fn set_send_timeout(listener: &tokio::net::TcpListener, timeout: Duration) {
    if timeout.is_zero() {
        return;
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = socket2::SockRef::from(listener).set_tcp_user_timeout(Some(timeout)) {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
    }
}

/// A client address for logs: refusals are logged at debug level only, since a flood of
/// them must not flood the logs too; the metrics count them.
pub fn shown(ip: Option<IpAddr>) -> String {
    ip.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string())
}

/// An IPv4-mapped IPv6 address is its IPv4 address, so that one client has one key.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// An address or a CIDR block, as `HERALD_TRUSTED_PROXIES` lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange(IpNet);

impl IpRange {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&canonical(ip))
    }
}

impl FromStr for IpRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let net = match s.split_once('/') {
            Some(_) => s.parse::<IpNet>().map_err(|_| {
                format!("{s:?} is not a CIDR block (an address, a slash and a prefix length)")
            })?,
            None => IpNet::from(
                s.parse::<IpAddr>()
                    .map_err(|_| format!("{s:?} is not an address or CIDR block"))?,
            ),
        };
        // An IPv4-mapped IPv6 block names IPv4 addresses, which is how clients are compared.
        let net = match net {
            IpNet::V6(v6) => match (v6.addr().to_ipv4_mapped(), v6.prefix_len()) {
                (Some(v4), prefix) if prefix >= 96 => {
                    IpNet::V4(Ipv4Net::new(v4, prefix - 96).map_err(|e| format!("{s:?}: {e}"))?)
                }
                _ => net,
            },
            v4 => v4,
        };
        Ok(Self(net.trunc()))
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for IpRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn limits(trusted: &str, adjust: impl FnOnce(&mut Config)) -> Limits {
        let mut config = Config {
            trusted_proxies: trusted
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().expect("range"))
                .collect(),
            ..Config::default()
        };
        adjust(&mut config);
        Limits::new(&config)
    }

    fn peer(ip: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(ip.parse().expect("ip"), 40000))
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).expect("header"));
        }
        map
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("ip"))
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_proxies() {
        let forwarded = headers(&[("x-forwarded-for", "203.0.113.9")]);
        let none = limits("", |_| {});
        assert_eq!(
            none.client_ip(peer("127.0.0.1"), &forwarded),
            ip("127.0.0.1")
        );
        let nginx = limits("127.0.0.1", |_| {});
        assert_eq!(
            nginx.client_ip(peer("127.0.0.1"), &forwarded),
            ip("203.0.113.9")
        );
        assert_eq!(
            nginx.client_ip(peer("198.51.100.7"), &forwarded),
            ip("198.51.100.7"),
            "an untrusted peer's header is ignored"
        );
    }

    #[test]
    fn a_spoofed_leftmost_hop_is_not_believed() {
        let nginx = limits("127.0.0.1,10.0.0.0/8", |_| {});
        // The client wrote 1.2.3.4 itself; the edge proxy 10.1.2.3 appended the real address.
        let forwarded = headers(&[("x-forwarded-for", "1.2.3.4, 203.0.113.9, 10.1.2.3")]);
        assert_eq!(
            nginx.client_ip(peer("127.0.0.1"), &forwarded),
            ip("203.0.113.9")
        );
        let garbled = headers(&[("x-forwarded-for", "1.2.3.4, junk")]);
        assert_eq!(
            nginx.client_ip(peer("127.0.0.1"), &garbled),
            ip("127.0.0.1")
        );
        let real_ip = headers(&[("x-real-ip", "203.0.113.10")]);
        assert_eq!(
            nginx.client_ip(peer("127.0.0.1"), &real_ip),
            ip("203.0.113.10")
        );
        assert_eq!(
            nginx.client_ip(peer("::ffff:127.0.0.1"), &real_ip),
            ip("203.0.113.10"),
            "a v4-mapped peer is its v4 address"
        );
    }

    #[test]
    fn ranges_parse_and_match() {
        let range: IpRange = "10.0.0.0/8".parse().expect("cidr");
        assert!(range.contains("10.200.1.1".parse().expect("ip")));
        assert!(!range.contains("11.0.0.1".parse().expect("ip")));
        let all: IpRange = "0.0.0.0/0".parse().expect("cidr");
        assert!(all.contains("8.8.8.8".parse().expect("ip")));
        let v6: IpRange = "fd00::/8".parse().expect("cidr");
        assert!(v6.contains("fd12::1".parse().expect("ip")));
        assert!("10.0.0.0/33".parse::<IpRange>().is_err());
        assert!("nginx".parse::<IpRange>().is_err());
        assert!("10.0.0.0/".parse::<IpRange>().is_err());
        // A lone address is a block of one; a mapped client address is its IPv4 address.
        let one: IpRange = " 192.0.2.7 ".parse().expect("address");
        assert!(one.contains("::ffff:192.0.2.7".parse().expect("ip")));
        assert!(!one.contains("192.0.2.8".parse().expect("ip")));
        assert_eq!(one.to_string(), "192.0.2.7/32");
        // An IPv4-mapped block names IPv4 addresses; host bits are dropped.
        let mapped: IpRange = "::ffff:10.1.2.3/104".parse().expect("mapped cidr");
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
        assert!(mapped.contains("10.9.9.9".parse().expect("ip")));
    }

    #[test]
    fn the_ip_rate_refuses_beyond_its_burst() {
        let limits = limits("", |c| c.ip_connect_rate = 2);
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        for _ in 0..4 {
            assert_eq!(limits.check_ip(a), Ok(()));
        }
        assert_eq!(limits.check_ip(a), Err(Refusal::RateLimited));
        assert_eq!(
            limits.check_ip(b),
            Ok(()),
            "other addresses are not affected"
        );
        let unlimited = self::limits("", |c| c.ip_connect_rate = 0);
        for _ in 0..100 {
            assert_eq!(unlimited.check_ip(a), Ok(()));
        }
    }

    #[test]
    fn idle_addresses_are_pruned() {
        let limits = limits("", |c| c.ip_connect_rate = 1000);
        for i in 0..50u8 {
            assert_eq!(limits.check_ip(Some(IpAddr::from([192, 0, 2, i]))), Ok(()));
        }
        let per_ip = limits.per_ip.as_ref().expect("limited");
        assert_eq!(per_ip.len(), 50);
        // At 1000/s, one connection's trace is gone after a millisecond.
        std::thread::sleep(Duration::from_millis(20));
        limits.retain_recent();
        assert_eq!(per_ip.len(), 0, "idle addresses are forgotten");
    }

    #[test]
    fn caps_hold_until_connections_end() {
        let limits = limits("", |c| {
            c.max_connections = 3;
            c.max_user_connections = 2;
        });
        let (alice, bob) = (UserId::new("alice"), UserId::new("bob"));
        let a1 = limits.admit(&alice).expect("first");
        let a2 = limits.admit(&alice).expect("second");
        assert_eq!(
            limits.admit(&alice).err(),
            Some(Refusal::TooManyConnections)
        );
        let b1 = limits.admit(&bob).expect("bob has his own count");
        assert_eq!(limits.admit(&bob).err(), Some(Refusal::ServerFull));
        drop(a1);
        let a3 = limits
            .admit(&alice)
            .expect("a closed connection frees its place");
        drop((a2, a3, b1));
        assert!(
            limits.per_user.lock().expect("lock").is_empty(),
            "no counts are kept for users without connections"
        );
    }
}
