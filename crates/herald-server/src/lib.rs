//! herald: a real-time messaging server with Socket.IO and plain WebSocket front doors.
//!
//! # Layout
//!
//! ```text
//! socket.io-client ─┐
//! plain WebSocket ──┼─► transport ─► session ─► hub ─► broker   (herald_core::Broker)
//! HTTP publish API ─┘   (sio, ws)                 └──► presence (herald_core::Presence)
//! ```
//!
//! - [`config`]: settings from the environment, a TOML file and flags.
//! - [`auth`]: JWT verification at the handshake, and development tokens.
//! - [`transport`]: the Socket.IO and `/ws` front doors.
//! - [`limits`]: admission at connect (rates and caps), and client addresses behind proxies.
//! - [`session`]: one client's commands, whatever its transport.
//! - [`protocol`]: the commands, error codes and ack shapes clients see.
//! - [`hub`]: the local room index and ordered fan-out.
//! - [`http`]: health, readiness, metrics and the HTTP API.
//! - [`drain`]: closing client transports in batches at shutdown.
//! - [`mailbox`]: the per-connection queues, which cost almost nothing while empty.
//! - [`metrics`] and [`telemetry`]: what herald reports about itself.
//!
//! [`run`] serves on a bound listener until a shutdown future resolves; `main` and the tests
//! both use it.

pub mod auth;
pub mod config;
pub mod drain;
pub mod http;
pub mod hub;
pub mod limits;
pub mod mailbox;
pub mod metrics;
pub mod protocol;
pub mod session;
pub mod telemetry;
pub mod transport;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::Context;
use herald_core::memory::{MemoryBroker, MemoryPresence};
use herald_core::{Broker, Namespace, Presence};
use herald_core::{PersistQueue, RoomPatterns, Store};
use herald_redis::{RedisBroker, RedisPresence, RedisQueue, RedisSettings};
use herald_store::{FleetQueue, MemoryQueue, Worker, WorkerSettings};
use metrics_exporter_prometheus::PrometheusHandle;
use socketioxide::SocketIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::config::{AuthMode, Config};
use crate::hub::Hub;

/// Everything the transports and HTTP handlers share.
pub struct AppState {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub verifier: Verifier,
    pub metrics: PrometheusHandle,
    /// Cancelled when shutdown begins: `/ready` fails and new connections are refused.
    pub draining: CancellationToken,
    /// The open connections and `/ws` sessions, closed in batches at shutdown.
    pub drain: Arc<drain::Drain>,
    pub started: Instant,
    connections: AtomicI64,
    /// The limits sessions follow.
    pub policy: Arc<session::Policy>,
    /// The limits connections are admitted under.
    pub limits: limits::Limits,
    /// Whether Redis is connected, when a fleet is configured.
    pub broker_connected: Option<watch::Receiver<bool>>,
    /// Open connections, awaited (up to the timeout) at shutdown.
    sessions: TaskTracker,
}

impl AppState {
    pub fn connections(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Whether herald runs in development mode: `HERALD_AUTH=off`, or no `JWT_SECRET` and no
    /// public key, so that tokens are signed with the generated development secret. The page
    /// at `/` offers `POST /dev/token` only then.
    pub fn dev_mode(&self) -> bool {
        self.config.auth == AuthMode::Off
            || (self.config.jwt_secret.is_none() && self.config.jwt_public_key.is_none())
    }
}

/// Counts one open connection, in `/api/stats` and the `herald_connections` gauge, for as
/// long as it lives.
pub struct ConnectionGuard {
    state: Arc<AppState>,
    labels: [(&'static str, String); 2],
    _session: tokio_util::task::task_tracker::TaskTrackerToken,
}

impl ConnectionGuard {
    pub fn new(state: &Arc<AppState>, transport: &'static str, namespace: &Namespace) -> Self {
        let labels = [
            ("transport", transport.to_owned()),
            ("namespace", namespace.to_string()),
        ];
        ::metrics::gauge!(metrics::CONNECTIONS, &labels).increment(1);
        state.connections.fetch_add(1, Ordering::Relaxed);
        Self {
            state: state.clone(),
            labels,
            _session: state.sessions.token(),
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        ::metrics::gauge!(metrics::CONNECTIONS, &self.labels).decrement(1);
        self.state.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The engines the configuration picks: broker, presence and the durable path.
struct Engines {
    broker: Arc<dyn Broker>,
    presence: Arc<dyn Presence>,
    connected: Option<watch::Receiver<bool>>,
    redis_presence: Option<Arc<RedisPresence>>,
    durable: Option<hub::Durable>,
    /// What this instance's worker reads: the persist queue, or in a fleet whose workers run
    /// apart (`HERALD_WORKER=off`), only the local queue of messages accepted while Redis was
    /// away, which no other worker can see.
    worker_queue: Option<Arc<dyn PersistQueue>>,
}

impl Engines {
    /// Redis when `redis_url` is set (serving alone until it is reachable), memory otherwise;
    /// and unless persistence is off, the store with the matching persist queue.
    async fn start(config: &Config, router: &hub::Router) -> anyhow::Result<Self> {
        let redis = config
            .redis_url
            .as_ref()
            .map(|url| redis_settings(config, url));
        let store = match config.persist {
            true => Some(open_store(config).await?),
            false => None,
        };
        if redis.is_some() && config.persist && config.database_url.is_none() {
            tracing::warn!(
                "REDIS_URL without DATABASE_URL: this instance's worker stores its share of the fleet's \
                 messages in its own SQLite file; set DATABASE_URL to a shared PostgreSQL"
            );
        }
        let rooms = match config.persist_rooms.is_empty() {
            true => RoomPatterns::any(),
            false => RoomPatterns::only(&config.persist_rooms),
        };
        let Some(settings) = redis else {
            let queue: Arc<dyn PersistQueue> = Arc::new(MemoryQueue::new(config.persist_queue));
            return Ok(Self {
                worker_queue: (store.is_some() && config.worker).then(|| queue.clone()),
                broker: Arc::new(MemoryBroker::new(
                    config.history_size,
                    Arc::new(router.clone()),
                )),
                presence: Arc::new(MemoryPresence::new()),
                connected: None,
                redis_presence: None,
                durable: store.map(|store| hub::Durable {
                    queue,
                    store,
                    rooms,
                }),
            });
        };
        let shared: Arc<dyn PersistQueue> = Arc::new(RedisQueue::new(
            settings.clone(),
            &worker_id(config),
            config.claim_idle,
        ));
        let broker = Arc::new(
            RedisBroker::start(settings.clone(), Arc::new(router.clone()))
                .context("configuring redis")?,
        );
        // Messages accepted while Redis is away are not in the persist stream: they wait in
        // a local queue, under the broker's fallback epoch, until this instance stores them.
        let fleet_queue = Arc::new(FleetQueue::new(
            shared,
            Arc::new(MemoryQueue::new(config.persist_queue)),
            broker.fallback_epoch(),
            broker.connected(),
        ));
        let worker_queue: Option<Arc<dyn PersistQueue>> = match (&store, config.worker) {
            (None, _) => None,
            (Some(_), true) => Some(fleet_queue.clone()),
            (Some(_), false) => Some(fleet_queue.local()),
        };
        let queue: Arc<dyn PersistQueue> = fleet_queue;
        let presence = Arc::new(RedisPresence::start(settings, broker.clone()));
        Ok(Self {
            worker_queue,
            connected: Some(broker.connected()),
            broker,
            presence: presence.clone(),
            redis_presence: Some(presence),
            durable: store.map(|store| hub::Durable {
                queue,
                store,
                rooms,
            }),
        })
    }
}

fn redis_settings(config: &Config, url: &str) -> RedisSettings {
    RedisSettings {
        url: url.to_owned(),
        password: config
            .redis_password
            .as_ref()
            .map(|p| p.expose().to_owned()),
        key: config.redis_key.clone(),
        namespaces: config.namespaces.clone(),
        history_size: config.history_size,
        history_ttl: config.history_ttl,
        presence_ttl: config.presence_ttl,
        uid: random_id(16),
        probe_interval: config.redis_probe_interval,
    }
}

fn worker_id(config: &Config) -> String {
    config
        .worker_id
        .clone()
        .unwrap_or_else(|| config.instance_id.clone())
}

/// Opens (and migrates) the configured store: PostgreSQL, or SQLite under the data dir.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    herald_store::open(config.database_url.as_deref(), &config.data_dir)
        .await
        .context("opening the store")
}

/// The worker settings from the configuration.
pub fn worker_settings(config: &Config) -> WorkerSettings {
    WorkerSettings {
        id: worker_id(config),
        batch_size: config.batch_size,
        batch_timeout: config.batch_timeout,
        max_backoff: std::time::Duration::from_secs(10),
    }
}

/// Runs the persist worker alone (`herald worker`) on the fleet's Redis stream until
/// `shutdown` resolves.
pub async fn run_worker(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let Some(url) = &config.redis_url else {
        anyhow::bail!(
            "herald worker reads the fleet's Redis persist stream: set REDIS_URL (a single instance runs its worker inside serve)"
        );
    };
    let handle = metrics::install();
    let store = open_store(&config).await?;
    let queue = Arc::new(RedisQueue::new(
        redis_settings(&config, url),
        &worker_id(&config),
        config.claim_idle,
    ));
    let addr = listener
        .local_addr()
        .context("reading the listener's address")?;
    tracing::info!(%addr, "worker listening: /health, /ready, /metrics");
    let stopping = CancellationToken::new();
    let server = axum::serve(listener, http::worker_app(handle, store.clone()))
        .with_graceful_shutdown(stopping.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });
    Worker::new(queue, store, worker_settings(&config))
        .run(shutdown)
        .await;
    stopping.cancel();
    match server.await {
        Ok(served) => served.context("serving the worker's HTTP endpoints"),
        Err(e) => Err(anyhow::anyhow!("the worker's HTTP task failed: {e}")),
    }
}

/// A random alphanumeric string of `len` characters.
pub fn random_id(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = vec![0u8; len];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: fall back to the clock and a counter, unique but guessable.
        static COUNTER: AtomicI64 = AtomicI64::new(0);
        let seed = hub::now_ms() ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(32);
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (seed.rotate_left(i as u32 * 7) & 0xff) as u8;
        }
    }
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// Serves herald on `listener` until `shutdown` resolves, then drains: reports not-ready,
/// closes every client transport so that clients reconnect elsewhere, and waits for sessions
/// to end, up to the configured timeout.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let verifier = Verifier::from_config(&config).context("loading JWT keys")?;
    if config.auth == AuthMode::Off {
        tracing::warn!(
            "HERALD_AUTH=off: anyone can connect without a token; never run this in production"
        );
    } else if config.jwt_secret.is_none() && config.jwt_public_key.is_none() {
        tracing::warn!(
            path = %config.data_dir.join("jwt-secret").display(),
            "JWT_SECRET is not set: using the generated development secret; `herald token` mints tokens for it, and the page at / mints them for clients on this machine only"
        );
    }
    let metrics = metrics::install();
    let stop_engines = CancellationToken::new();
    let stop_worker = CancellationToken::new();
    let sio_cell = Arc::new(OnceLock::new());
    let (router, shards) = hub::router(std::thread::available_parallelism().map_or(2, |n| n.get()));
    let engines = Engines::start(&config, &router).await?;
    let worker = match (&engines.durable, &engines.worker_queue) {
        (Some(durable), Some(queue)) => {
            let worker = Worker::new(
                queue.clone(),
                durable.store.clone(),
                worker_settings(&config),
            );
            let stop = stop_worker.clone();
            Some(tokio::spawn(async move {
                worker.run(stop.cancelled_owned()).await
            }))
        }
        _ => None,
    };
    let hub_engines = hub::HubEngines {
        broker: engines.broker.clone(),
        presence: engines.presence.clone(),
        durable: engines.durable,
    };
    let hub = Hub::start(
        &config.instance_id,
        hub_engines,
        router,
        shards,
        sio_cell.clone(),
        stop_engines.clone(),
    );

    let policy = Arc::new(session::Policy::new(&config));
    let limits = limits::Limits::new(&config);
    let state = Arc::new(AppState {
        config,
        hub,
        verifier,
        metrics,
        draining: CancellationToken::new(),
        drain: drain::Drain::new(),
        started: Instant::now(),
        connections: AtomicI64::new(0),
        sessions: TaskTracker::new(),
        broker_connected: engines.connected.clone(),
        limits,
        policy,
    });
    tokio::spawn(limits::prune(Arc::downgrade(&state)));
    let (sio_layer, io) = SocketIo::builder()
        .max_payload((state.config.max_payload + 16 * 1024) as u64)
        .max_buffer_size(state.config.outbound_queue)
        // Allocated for every websocket and grown on demand: events are small, and an idle
        // connection should cost little (benches/bar5-idle-memory.sh).
        .ws_read_buffer_size(1024)
        .build_layer();
    transport::sio::attach(&io, &state);
    let _ = sio_cell.set(io.clone());

    let app = http::app(state.clone())
        .layer(sio_layer)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            transport::sio::limit_handshakes,
        ))
        .layer(axum::middleware::map_request(
            transport::sio::detach_from_read_buffer,
        ))
        .layer(http::cors(&state.config.cors_origins));
    let addr = listener
        .local_addr()
        .context("reading the listener's address")?;
    tracing::info!(%addr, "herald listening");
    let draining = state.draining.clone();
    // Accepted sockets inherit the listener's TCP_USER_TIMEOUT.
    limits::set_send_timeout(&listener, state.config.send_timeout);
    // `tap_io` only to reuse axum's `ConnectInfo<SocketAddr>` for a wrapped listener.
    let listener = axum::serve::ListenerExt::tap_io(
        drain::DrainListener::new(listener, state.drain.clone()),
        |_| {},
    );
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { draining.cancelled().await });
    let server = tokio::spawn(async move { server.await });

    shutdown.await;
    let timeout = state.config.shutdown_timeout;
    // One deadline for the whole shutdown. Closing connections may use three quarters of it,
    // so that the worker always has the rest to store what it still holds.
    let started = tokio::time::Instant::now();
    let (connections_by, deadline) = (started + timeout * 3 / 4, started + timeout);
    tracing::info!(
        ?timeout,
        connections = state.connections(),
        "shutting down: draining connections"
    );
    state.draining.cancel();
    // Clients reconnect elsewhere a batch at a time and recover by offset there. Whatever is
    // left after the batches (long-polling sessions, which hold no connection) closes at once.
    let drained = tokio::time::timeout_at(
        connections_by,
        state
            .drain
            .close_in_batches(state.config.drain_batch, state.config.drain_interval),
    )
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown timeout reached while closing connections in batches");
    }
    // Bounded as well: a socket whose peer stopped reading must not hold the shutdown.
    if tokio::time::timeout_at(connections_by, io.close())
        .await
        .is_err()
    {
        tracing::warn!("shutdown timeout reached while closing Socket.IO sessions");
    }
    state.sessions.close();
    if tokio::time::timeout_at(connections_by, state.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = state.connections(),
            "shutdown timeout reached with connections still open"
        );
    }
    // The worker stores what is still queued, then stops; presence is cleared meanwhile.
    stop_worker.cancel();
    if let Some(presence) = &engines.redis_presence
        && tokio::time::timeout_at(deadline, presence.clear())
            .await
            .is_err()
    {
        // The entries expire after HERALD_PRESENCE_TTL, as after a crash.
        tracing::warn!("presence entries were not removed within the shutdown timeout");
    }
    if let Some(worker) = worker
        && tokio::time::timeout_at(deadline, worker).await.is_err()
    {
        tracing::warn!("the persist worker did not finish within the shutdown timeout");
    }
    stop_engines.cancel();
    match tokio::time::timeout_at(deadline, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(e).context("http server failed"),
        Ok(Err(e)) => return Err(e).context("http server task failed"),
        Err(_) => tracing::warn!("http server did not stop within the shutdown timeout"),
    }
    tracing::info!("herald stopped");
    Ok(())
}
