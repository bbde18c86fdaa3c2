//! Configuration: defaults, then environment variables, then an optional TOML file, then
//! command-line flags, each overriding the one before; validated once at start.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_core::Namespace;
use serde::Serialize;

use crate::limits::IpRange;

/// A setting that could not be used. Its message names the setting and the source it came
/// from, in one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{source_name}: invalid value {value:?}: {reason}")]
    Invalid {
        source_name: String,
        value: String,
        reason: String,
    },
    #[error("{0}: unknown setting")]
    Unknown(String),
    #[error("config file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("{setting}: {reason}")]
    Rule {
        setting: &'static str,
        reason: String,
    },
}

/// Whether clients must present a valid token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Tokens are required (the default).
    On,
    /// Development only: anonymous users are accepted, and loudly logged.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A secret that never appears in `check-config` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// herald's effective configuration. Field names are the TOML keys.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Address to listen on.
    pub host: IpAddr,
    pub port: u16,
    /// Connections the kernel holds for `accept` (capped by `net.core.somaxconn`). A connect
    /// storm beyond it loses SYNs, and those clients wait a second to retry.
    pub listen_backlog: u32,
    /// This instance's name in logs, `session` events and metrics.
    pub instance_id: String,
    /// Socket.IO namespaces served; each is its own room space.
    pub namespaces: Vec<Namespace>,
    pub auth: AuthMode,
    /// HS256 secret. Without it (and without a public key) a generated development secret is
    /// kept in `data_dir/jwt-secret`.
    pub jwt_secret: Option<Secret>,
    /// RS256/ES256 public key: PEM text, or the path of a PEM file.
    pub jwt_public_key: Option<String>,
    /// Bearer key of the HTTP API; without it the API is off (but for loopback in dev mode).
    pub api_key: Option<Secret>,
    pub data_dir: PathBuf,
    /// Messages kept per room for `join {since}` and `history`.
    pub history_size: usize,
    /// Largest message `data`, in bytes (JSON-encoded).
    pub max_payload: usize,
    /// Deliveries queued per connection before it counts as a slow consumer.
    pub outbound_queue: usize,
    /// Events per second one connection may send (bursts of twice that); 0 disables.
    pub event_rate: u32,
    /// Events per second one user may send over all their connections here; 0 disables.
    pub user_event_rate: u32,
    /// New connections per second from one client address (bursts of twice that); 0 disables.
    pub ip_connect_rate: u32,
    /// Open connections this instance accepts; 0 is unlimited.
    pub max_connections: usize,
    /// Open connections one user may hold on this instance; 0 is unlimited.
    pub max_user_connections: usize,
    /// Rooms one connection may join (beyond its own personal room); 0 is unlimited.
    pub max_rooms: usize,
    /// How long data sent to a client may stay unacknowledged (a peer that stopped reading)
    /// before the connection is aborted: TCP_USER_TIMEOUT on Linux; 0 leaves the system's.
    #[serde(serialize_with = "serialize_duration")]
    pub send_timeout: Duration,
    /// Proxies (addresses or CIDR blocks) whose `X-Forwarded-For` / `X-Real-IP` name the
    /// client; from any other peer those headers are ignored.
    pub trusted_proxies: Vec<IpRange>,
    /// How long a stopping instance waits for its connections, queue and presence.
    #[serde(serialize_with = "serialize_duration")]
    pub shutdown_timeout: Duration,
    /// Client transports closed per batch while draining at shutdown.
    pub drain_batch: usize,
    /// Pause between drain batches, so that clients reconnect elsewhere in waves.
    #[serde(serialize_with = "serialize_duration")]
    pub drain_interval: Duration,
    pub log_format: LogFormat,
    /// Origins browsers may call from (Socket.IO polling, the HTTP API); `*` is any origin.
    /// Auth is by token, never by cookie, so no credentials are allowed cross-origin.
    pub cors_origins: Vec<String>,
    /// Redis for a fleet of instances; without it herald runs as one instance in memory.
    #[serde(serialize_with = "serialize_url")]
    pub redis_url: Option<String>,
    /// Overrides the password in `redis_url`.
    pub redis_password: Option<Secret>,
    /// Prefix of every Redis channel and key: the adapter's `key` option.
    pub redis_key: String,
    /// How long an idle room's offset and history live in Redis.
    #[serde(serialize_with = "serialize_duration")]
    pub history_ttl: Duration,
    /// How long a presence entry lives without its instance's heartbeat.
    #[serde(serialize_with = "serialize_duration")]
    pub presence_ttl: Duration,
    /// PostgreSQL for the store; without it, SQLite at `data_dir/herald.db`.
    #[serde(serialize_with = "serialize_url")]
    pub database_url: Option<String>,
    /// Whether messages are stored at all (`HERALD_PERSIST=off` disables the durable path).
    pub persist: bool,
    /// Glob patterns of the rooms that persist; empty means every room.
    pub persist_rooms: Vec<String>,
    /// Messages queued in-process for the store before publishers wait (single instance).
    pub persist_queue: usize,
    /// Whether `serve` runs the persist worker itself (`herald worker` runs it alone).
    pub worker: bool,
    /// The worker's name in logs and in the Redis consumer group; default the instance id.
    pub worker_id: Option<String>,
    pub batch_size: usize,
    #[serde(serialize_with = "serialize_duration")]
    pub batch_timeout: Duration,
    /// How long a Redis persist entry stays pending (its worker presumed dead) before another
    /// worker claims it.
    #[serde(serialize_with = "serialize_duration")]
    pub claim_idle: Duration,
    /// How often the Redis pub/sub connection is probed: a message published on this
    /// instance's private channel must come back before the next probe, or the connection is
    /// presumed dead and replaced.
    #[serde(serialize_with = "serialize_duration")]
    pub redis_probe_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: IpAddr::from([0, 0, 0, 0]),
            port: 3000,
            listen_backlog: 4096,
            instance_id: default_instance_id(),
            namespaces: vec![Namespace::root()],
            auth: AuthMode::On,
            jwt_secret: None,
            jwt_public_key: None,
            api_key: None,
            data_dir: PathBuf::from("./data"),
            history_size: 1000,
            max_payload: 64 * 1024,
            outbound_queue: 1024,
            event_rate: 1000,
            user_event_rate: 5000,
            ip_connect_rate: 50,
            max_connections: 100_000,
            max_user_connections: 100,
            max_rooms: 128,
            trusted_proxies: Vec::new(),
            send_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(10),
            drain_batch: 500,
            drain_interval: Duration::from_millis(100),
            log_format: LogFormat::Text,
            cors_origins: vec!["*".to_owned()],
            redis_url: None,
            redis_password: None,
            redis_key: "socket.io".to_owned(),
            history_ttl: Duration::from_secs(24 * 3600),
            presence_ttl: Duration::from_secs(45),
            database_url: None,
            persist: true,
            persist_rooms: Vec::new(),
            persist_queue: 10_000,
            worker: true,
            worker_id: None,
            batch_size: 100,
            batch_timeout: Duration::from_secs(5),
            claim_idle: Duration::from_secs(30),
            redis_probe_interval: Duration::from_secs(2),
        }
    }
}

/// Environment variables and the settings they set. The seeds' names (`PORT`, `JWT_SECRET`,
/// `INSTANCE_ID`) are kept; everything else is `HERALD_…`.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("PORT", "port"),
    ("HERALD_LISTEN_BACKLOG", "listen_backlog"),
    ("HERALD_HOST", "host"),
    ("INSTANCE_ID", "instance_id"),
    ("HERALD_NAMESPACES", "namespaces"),
    ("HERALD_AUTH", "auth"),
    ("JWT_SECRET", "jwt_secret"),
    ("HERALD_JWT_PUBLIC_KEY", "jwt_public_key"),
    ("HERALD_API_KEY", "api_key"),
    ("HERALD_DATA_DIR", "data_dir"),
    ("HERALD_HISTORY_SIZE", "history_size"),
    ("HERALD_MAX_PAYLOAD", "max_payload"),
    ("HERALD_OUTBOUND_QUEUE", "outbound_queue"),
    ("HERALD_EVENT_RATE", "event_rate"),
    ("HERALD_USER_EVENT_RATE", "user_event_rate"),
    ("HERALD_IP_CONNECT_RATE", "ip_connect_rate"),
    ("HERALD_MAX_CONNECTIONS", "max_connections"),
    ("HERALD_MAX_USER_CONNECTIONS", "max_user_connections"),
    ("HERALD_MAX_ROOMS", "max_rooms"),
    ("HERALD_TRUSTED_PROXIES", "trusted_proxies"),
    ("HERALD_SEND_TIMEOUT", "send_timeout"),
    ("HERALD_SHUTDOWN_TIMEOUT", "shutdown_timeout"),
    ("HERALD_DRAIN_BATCH", "drain_batch"),
    ("HERALD_DRAIN_INTERVAL", "drain_interval"),
    ("HERALD_LOG_FORMAT", "log_format"),
    ("HERALD_CORS_ORIGINS", "cors_origins"),
    ("REDIS_URL", "redis_url"),
    ("REDIS_PASSWORD", "redis_password"),
    ("HERALD_REDIS_KEY", "redis_key"),
    ("HERALD_HISTORY_TTL", "history_ttl"),
    ("HERALD_PRESENCE_TTL", "presence_ttl"),
    ("POSTGRES_URL", "database_url"),
    ("DATABASE_URL", "database_url"),
    ("HERALD_PERSIST", "persist"),
    ("HERALD_PERSIST_ROOMS", "persist_rooms"),
    ("HERALD_PERSIST_QUEUE", "persist_queue"),
    ("HERALD_WORKER", "worker"),
    ("WORKER_ID", "worker_id"),
    ("BATCH_SIZE", "batch_size"),
    ("BATCH_TIMEOUT", "batch_timeout"),
    ("HERALD_CLAIM_IDLE", "claim_idle"),
    ("HERALD_REDIS_PROBE_INTERVAL", "redis_probe_interval"),
];

/// `HERALD_*` names in `env` that herald does not know: most likely typos, which would
/// otherwise be ignored without a word.
pub fn unknown_env_names(env: &HashMap<String, String>) -> Vec<String> {
    let mut unknown: Vec<String> = env
        .keys()
        .filter(|name| name.starts_with("HERALD_"))
        .filter(|name| !ENV_VARS.iter().any(|(known, _)| known == name))
        .cloned()
        .collect();
    unknown.sort();
    unknown
}

impl Config {
    /// Builds the configuration from `env`, then the TOML file at `file`, then `flags`
    /// (setting name, value), and validates it.
    pub fn load(
        env: &HashMap<String, String>,
        file: Option<&Path>,
        flags: &[(&str, String)],
    ) -> Result<Self, ConfigError> {
        let mut config = Config::default();
        for (var, key) in ENV_VARS {
            if let Some(value) = env.get(*var).filter(|v| !v.is_empty()) {
                config.set(key, value, var)?;
            }
        }
        if let Some(path) = file {
            config.apply_file(path)?;
        }
        for (key, value) in flags {
            config.set(key, value, &format!("--{}", key.replace('_', "-")))?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Sets one setting from its text form; `source_name` says where it came from in errors.
    pub fn set(&mut self, key: &str, value: &str, source_name: &str) -> Result<(), ConfigError> {
        let invalid = |reason: &dyn fmt::Display| ConfigError::Invalid {
            source_name: source_name.to_owned(),
            value: if key.contains("secret") || key.contains("password") || key == "api_key" {
                "<redacted>".into()
            } else {
                value.to_owned()
            },
            reason: reason.to_string(),
        };
        match key {
            "host" => self.host = value.parse().map_err(|e| invalid(&e))?,
            "port" => self.port = value.parse().map_err(|e| invalid(&e))?,
            "listen_backlog" => self.listen_backlog = value.parse().map_err(|e| invalid(&e))?,
            "instance_id" => self.instance_id = value.to_owned(),
            "namespaces" => {
                self.namespaces = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(Namespace::new)
                    .collect();
            }
            "auth" => {
                self.auth = if parse_switch(value).map_err(|e| invalid(&e))? {
                    AuthMode::On
                } else {
                    AuthMode::Off
                };
            }
            "jwt_secret" => self.jwt_secret = Some(Secret::new(value)),
            "jwt_public_key" => self.jwt_public_key = Some(value.to_owned()),
            "api_key" => self.api_key = Some(Secret::new(value)),
            "data_dir" => self.data_dir = PathBuf::from(value),
            "history_size" => self.history_size = value.parse().map_err(|e| invalid(&e))?,
            "max_payload" => self.max_payload = parse_size(value).map_err(|e| invalid(&e))?,
            "outbound_queue" => self.outbound_queue = value.parse().map_err(|e| invalid(&e))?,
            "shutdown_timeout" => {
                self.shutdown_timeout = parse_duration(value).map_err(|e| invalid(&e))?
            }
            "drain_batch" => self.drain_batch = value.parse().map_err(|e| invalid(&e))?,
            "drain_interval" => {
                self.drain_interval = parse_duration(value).map_err(|e| invalid(&e))?
            }
            "log_format" => {
                self.log_format = match value {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    _ => return Err(invalid(&"expected text or json")),
                }
            }
            "redis_url" => {
                if !(value.starts_with("redis://") || value.starts_with("rediss://")) {
                    return Err(invalid(&"expected a redis:// or rediss:// URL"));
                }
                self.redis_url = Some(value.to_owned());
            }
            "redis_password" => self.redis_password = Some(Secret::new(value)),
            "redis_key" => self.redis_key = value.to_owned(),
            "history_ttl" => self.history_ttl = parse_duration(value).map_err(|e| invalid(&e))?,
            "presence_ttl" => self.presence_ttl = parse_duration(value).map_err(|e| invalid(&e))?,
            "database_url" => {
                let known = ["postgres://", "postgresql://", "sqlite:"];
                if !known.iter().any(|k| value.starts_with(k)) {
                    return Err(invalid(
                        &"expected a postgres://, postgresql:// or sqlite: URL",
                    ));
                }
                self.database_url = Some(value.to_owned());
            }
            "persist" => self.persist = parse_switch(value).map_err(|e| invalid(&e))?,
            "worker" => self.worker = parse_switch(value).map_err(|e| invalid(&e))?,
            "persist_rooms" => {
                self.persist_rooms = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            "event_rate" => self.event_rate = value.parse().map_err(|e| invalid(&e))?,
            "user_event_rate" => self.user_event_rate = value.parse().map_err(|e| invalid(&e))?,
            "ip_connect_rate" => self.ip_connect_rate = value.parse().map_err(|e| invalid(&e))?,
            "max_connections" => self.max_connections = value.parse().map_err(|e| invalid(&e))?,
            "max_user_connections" => {
                self.max_user_connections = value.parse().map_err(|e| invalid(&e))?
            }
            "max_rooms" => self.max_rooms = value.parse().map_err(|e| invalid(&e))?,
            "send_timeout" => self.send_timeout = parse_duration(value).map_err(|e| invalid(&e))?,
            "trusted_proxies" => {
                self.trusted_proxies = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .map_err(|e: String| invalid(&e))?;
            }
            "persist_queue" => self.persist_queue = value.parse().map_err(|e| invalid(&e))?,
            "worker_id" => self.worker_id = Some(value.to_owned()),
            "batch_size" => self.batch_size = value.parse().map_err(|e| invalid(&e))?,
            "batch_timeout" => {
                self.batch_timeout = parse_duration(value).map_err(|e| invalid(&e))?
            }
            "claim_idle" => self.claim_idle = parse_duration(value).map_err(|e| invalid(&e))?,
            "redis_probe_interval" => {
                self.redis_probe_interval = parse_duration(value).map_err(|e| invalid(&e))?
            }
            "cors_origins" => {
                self.cors_origins = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                if let Some(bad) = self
                    .cors_origins
                    .iter()
                    .find(|o| *o != "*" && axum::http::HeaderValue::from_str(o).is_err())
                {
                    return Err(invalid(&format!("{bad:?} is not a valid origin")));
                }
            }
            _ => return Err(ConfigError::Unknown(source_name.to_owned())),
        }
        Ok(())
    }

    fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let shown = path.display().to_string();
        let file_error = |reason: String| ConfigError::File {
            path: shown.clone(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| file_error(e.message().to_owned()))?;
        for (key, value) in table {
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Array(items) => items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string())
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            self.set(&key, &text, &format!("{shown}: {key}"))?;
        }
        Ok(())
    }

    /// Checks the rules that span settings or bound them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let rule = |setting, reason: &str| {
            Err(ConfigError::Rule {
                setting,
                reason: reason.into(),
            })
        };
        if self.namespaces.is_empty() {
            return rule("HERALD_NAMESPACES", "at least one namespace is required");
        }
        if self.instance_id.trim().is_empty() {
            return rule("INSTANCE_ID", "must not be empty");
        }
        if self.drain_batch == 0 {
            return rule("HERALD_DRAIN_BATCH", "must be at least 1");
        }
        if self.listen_backlog == 0 {
            return rule("HERALD_LISTEN_BACKLOG", "must be at least 1");
        }
        if self.history_size > 1_000_000 {
            return rule("HERALD_HISTORY_SIZE", "must be at most 1000000");
        }
        if self.max_payload == 0 || self.max_payload > 16 * 1024 * 1024 {
            return rule("HERALD_MAX_PAYLOAD", "must be between 1 byte and 16MiB");
        }
        if self.redis_key.is_empty() || self.redis_key.contains('#') {
            return rule("HERALD_REDIS_KEY", "must be non-empty and without '#'");
        }
        if self.presence_ttl < Duration::from_secs(1) {
            return rule("HERALD_PRESENCE_TTL", "must be at least 1s");
        }
        if self.batch_size == 0 || self.batch_size > 100_000 {
            return rule("BATCH_SIZE", "must be between 1 and 100000");
        }
        if self.persist_queue == 0 {
            return rule("HERALD_PERSIST_QUEUE", "must be at least 1");
        }
        if self.outbound_queue == 0 {
            return rule("HERALD_OUTBOUND_QUEUE", "must be at least 1");
        }
        if self.max_connections > 10_000_000 {
            return rule(
                "HERALD_MAX_CONNECTIONS",
                "must be at most 10000000 (0 is unlimited)",
            );
        }
        if self
            .jwt_secret
            .as_ref()
            .is_some_and(|s| s.expose().len() < 8)
        {
            return rule("JWT_SECRET", "must be at least 8 bytes");
        }
        if self.api_key.as_ref().is_some_and(|s| s.expose().len() < 8) {
            return rule("HERALD_API_KEY", "must be at least 8 bytes");
        }
        if self.redis_probe_interval < Duration::from_millis(100)
            || self.redis_probe_interval > Duration::from_secs(60)
        {
            return rule(
                "HERALD_REDIS_PROBE_INTERVAL",
                "must be between 100ms and 60s",
            );
        }
        Ok(())
    }

    /// The configuration as TOML, secrets redacted, for `herald check-config`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}"))
    }
}

fn default_instance_id() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// Parses on/off (or true/false, 1/0).
fn parse_switch(value: &str) -> Result<bool, &'static str> {
    match value {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err("expected on or off"),
    }
}

/// Parses "10s", "500ms", "1h" or a bare number of seconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    if let Ok(secs) = value.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(value).map_err(|e| e.to_string())
}

/// Parses a byte count: "65536", "64KiB", "1MiB" (KB/MB are read as KiB/MiB).
fn parse_size(value: &str) -> Result<usize, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| "expected a number of bytes".to_owned())?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return Err(format!("unknown unit {unit:?}")),
    };
    n.checked_mul(scale).ok_or_else(|| "too large".to_owned())
}

/// Prints a URL without its password.
fn serialize_url<S: serde::Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => s.serialize_str(&herald_core::redact::redact_url(url)),
        None => s.serialize_none(),
    }
}

fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_need_nothing() {
        let config = Config::load(&env(&[]), None, &[]).expect("defaults are valid");
        assert_eq!(config.port, 3000);
        assert_eq!(config.history_size, 1000);
        assert_eq!(config.namespaces, vec![Namespace::root()]);
        assert_eq!(config.auth, AuthMode::On);
    }

    #[test]
    fn seed_names_and_herald_names_are_read() {
        let config = Config::load(
            &env(&[
                ("PORT", "4000"),
                ("INSTANCE_ID", "a1"),
                ("JWT_SECRET", "0123456789"),
                ("HERALD_NAMESPACES", "/, events"),
                ("HERALD_MAX_PAYLOAD", "1KiB"),
                ("HERALD_SHUTDOWN_TIMEOUT", "2s"),
            ]),
            None,
            &[],
        )
        .expect("valid");
        assert_eq!(config.port, 4000);
        assert_eq!(config.instance_id, "a1");
        assert_eq!(
            config.namespaces,
            vec![Namespace::root(), Namespace::new("/events")]
        );
        assert_eq!(config.max_payload, 1024);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(2));
    }

    #[test]
    fn unknown_herald_names_are_reported_and_others_ignored() {
        let names = unknown_env_names(&env(&[
            ("HERALD_DRAIN_BATCH", "10"),
            ("HERALD_SHUTDOWN_TIMOUT", "5s"),
            ("PATH", "/usr/bin"),
        ]));
        assert_eq!(names, vec!["HERALD_SHUTDOWN_TIMOUT".to_owned()]);
    }

    #[test]
    fn file_overrides_env_and_flags_override_file() {
        let dir = std::env::temp_dir().join(format!("herald-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("herald.toml");
        std::fs::write(
            &path,
            "port = 5000\nhistory_size = 7\nnamespaces = [\"/\", \"/x\"]\n",
        )
        .expect("write config");
        let config = Config::load(
            &env(&[("PORT", "4000"), ("HERALD_HISTORY_SIZE", "3")]),
            Some(&path),
            &[("port", "6000".into())],
        )
        .expect("valid");
        assert_eq!(config.port, 6000);
        assert_eq!(config.history_size, 7);
        assert_eq!(config.namespaces.len(), 2);
    }

    #[test]
    fn a_bad_setting_is_one_clear_line_naming_it() {
        let err = Config::load(&env(&[("PORT", "eighty")]), None, &[]).expect_err("bad port");
        let line = err.to_string();
        assert!(line.starts_with("PORT: invalid value \"eighty\""), "{line}");
        assert!(!line.contains('\n'));

        let err = Config::load(&env(&[("HERALD_AUTH", "maybe")]), None, &[]).expect_err("bad");
        assert!(err.to_string().starts_with("HERALD_AUTH:"), "{err}");

        let err = Config::load(&env(&[("JWT_SECRET", "short")]), None, &[]).expect_err("short");
        assert!(err.to_string().starts_with("JWT_SECRET:"), "{err}");
        assert!(
            !err.to_string().contains("short\""),
            "secrets are not echoed: {err}"
        );
    }

    #[test]
    fn the_redis_probe_interval_is_read_and_bounded() {
        let vars = env(&[("HERALD_REDIS_PROBE_INTERVAL", "500ms")]);
        let config = Config::load(&vars, None, &[]).expect("valid");
        assert_eq!(config.redis_probe_interval, Duration::from_millis(500));
        assert!(
            config
                .to_redacted_toml()
                .contains("redis_probe_interval = \"500ms\""),
            "check-config shows it"
        );
        let err = Config::load(&env(&[("HERALD_REDIS_PROBE_INTERVAL", "1ms")]), None, &[])
            .expect_err("too short");
        assert!(
            err.to_string().starts_with("HERALD_REDIS_PROBE_INTERVAL:"),
            "{err}"
        );
    }

    #[test]
    fn limits_are_read_and_checked() {
        let config = Config::load(
            &env(&[
                ("HERALD_IP_CONNECT_RATE", "0"),
                ("HERALD_MAX_CONNECTIONS", "500"),
                ("HERALD_MAX_USER_CONNECTIONS", "5"),
                ("HERALD_MAX_ROOMS", "3"),
                ("HERALD_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8"),
                ("HERALD_SEND_TIMEOUT", "30s"),
            ]),
            None,
            &[],
        )
        .expect("valid");
        assert_eq!(config.ip_connect_rate, 0);
        assert_eq!(config.max_connections, 500);
        assert_eq!(config.max_user_connections, 5);
        assert_eq!(config.max_rooms, 3);
        assert_eq!(config.trusted_proxies.len(), 2);
        assert_eq!(config.send_timeout, Duration::from_secs(30));
        let text = config.to_redacted_toml();
        assert!(
            text.contains("\"127.0.0.1/32\"") && text.contains("\"10.0.0.0/8\""),
            "{text}"
        );

        let err = Config::load(&env(&[("HERALD_TRUSTED_PROXIES", "nginx")]), None, &[])
            .expect_err("not an address");
        assert!(
            err.to_string()
                .starts_with("HERALD_TRUSTED_PROXIES: invalid value"),
            "{err}"
        );
        let err =
            Config::load(&env(&[("HERALD_MAX_ROOMS", "-1")]), None, &[]).expect_err("negative");
        assert!(err.to_string().starts_with("HERALD_MAX_ROOMS:"), "{err}");
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = std::env::temp_dir().join(format!("herald-config-u-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("herald.toml");
        std::fs::write(&path, "prot = 5000\n").expect("write config");
        let err = Config::load(&env(&[]), Some(&path), &[]).expect_err("typo");
        assert!(err.to_string().contains("prot: unknown setting"), "{err}");
    }

    #[test]
    fn check_config_redacts_secrets() {
        let config = Config::load(
            &env(&[
                ("JWT_SECRET", "supersecretvalue"),
                ("HERALD_API_KEY", "apikey-123456"),
            ]),
            None,
            &[],
        )
        .expect("valid");
        let text = config.to_redacted_toml();
        assert!(!text.contains("supersecretvalue"));
        assert!(!text.contains("apikey-123456"));
        assert!(text.contains("jwt_secret = \"<redacted>\""), "{text}");
    }
}
