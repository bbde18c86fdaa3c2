//! One simulated client: connect, join, then read promptly and publish on schedule.
//!
//! It connects (TCP, WebSocket upgrade, Engine.IO open and Socket.IO connect, or `/ws`),
//! joins its rooms, then reads every frame as it comes while publishing on its schedule,
//! recording latency, acks and what it received.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::accounting::{ClientLedger, Insert, Membership, OffsetSet};
use crate::args::{Header, TokenIn, Transport};
use crate::latency::Recorder;
use crate::plan::Plan;
use crate::proto::{self, Frame, Probe};

type Ws = WebSocketStream<TcpStream>;

/// Where the run is: every client watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connecting and joining.
    Setup,
    /// Senders publish.
    Run,
    /// Senders stop; everyone keeps reading.
    Stop,
    /// Close and report.
    Done,
}

/// A monotonic clock in microseconds since the Unix epoch, read once from the wall clock,
/// so timestamps are comparable across processes and never jump during a run.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
    wall_us: u64,
}

impl Clock {
    pub fn new() -> Self {
        let wall_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Self {
            epoch: Instant::now(),
            wall_us,
        }
    }

    pub fn now_us(&self) -> u64 {
        self.wall_us + self.epoch.elapsed().as_micros() as u64
    }

    /// Microseconds since the clock started.
    pub fn elapsed_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// The Unix time (µs) of a reading of `elapsed_us`.
    pub fn unix_us(&self, elapsed_us: u64) -> u64 {
        self.wall_us + elapsed_us
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// An instance to connect to.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` as given, for the URL and the Host header.
    pub authority: String,
}

/// Why a connection or join failed; `reason()` groups them in the report.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("socket: {0}")]
    Socket(std::io::Error),
    #[error("bind: {0}")]
    Bind(std::io::Error),
    #[error("tcp connect: {0}")]
    Tcp(std::io::Error),
    #[error("http {0}")]
    Http(u16),
    #[error("websocket handshake: {0}")]
    Handshake(String),
    #[error("socket.io connect_error: {0}")]
    Refused(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("closed during the handshake")]
    Closed,
    #[error("connect timeout")]
    Timeout,
    #[error("join: {0}")]
    Join(String),
    #[error("join timeout")]
    JoinTimeout,
}

impl ConnectError {
    fn from_ws(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Http(response) => ConnectError::Http(response.status().as_u16()),
            tungstenite::Error::Io(e) => ConnectError::Handshake(e.kind().to_string()),
            other => ConnectError::Handshake(other.to_string()),
        }
    }

    /// A short reason shared by failures of the same kind.
    pub fn reason(&self) -> String {
        match self {
            ConnectError::Socket(e) | ConnectError::Bind(e) | ConnectError::Tcp(e) => {
                let stage = match self {
                    ConnectError::Socket(_) => "socket",
                    ConnectError::Bind(_) => "bind",
                    _ => "tcp connect",
                };
                match e.raw_os_error() {
                    Some(code) => format!("{stage}: {} (os error {code})", e.kind()),
                    None => format!("{stage}: {}", e.kind()),
                }
            }
            other => other.to_string(),
        }
    }

    fn is_join(&self) -> bool {
        matches!(self, ConnectError::Join(_) | ConnectError::JoinTimeout)
    }
}

/// Counters every client updates; the coordinator reads them for progress and the report.
#[derive(Default)]
pub struct Stats {
    pub connected: AtomicU64,
    pub connect_failed: AtomicU64,
    pub joined: AtomicU64,
    pub join_failed: AtomicU64,
    pub sent: AtomicU64,
    pub acked_ok: AtomicU64,
    pub ack_failed: AtomicU64,
    pub throttled: AtomicU64,
    /// For each ack ok, the joined members of its room.
    pub expected: AtomicU64,
    pub disconnected: AtomicU64,
    pub unreadable: AtomicU64,
    /// Senders that have sent their --count.
    pub senders_done: AtomicU64,
    /// Clock microseconds of the first connection attempt and the last completed one.
    pub first_connect_us: AtomicU64,
    pub last_connect_us: AtomicU64,
    pub failures: Mutex<BTreeMap<String, u64>>,
    pub ack_errors: Mutex<BTreeMap<String, u64>>,
    pub disconnects: Mutex<BTreeMap<String, u64>>,
    pub connect_latency: Mutex<Option<Histogram<u64>>>,
}

impl Stats {
    pub fn new() -> Self {
        Self {
            first_connect_us: AtomicU64::new(u64::MAX),
            connect_latency: Mutex::new(Some(crate::latency::histogram())),
            ..Self::default()
        }
    }

    pub fn count(map: &Mutex<BTreeMap<String, u64>>, reason: String) {
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(reason).or_default() += 1;
    }

    pub fn snapshot(map: &Mutex<BTreeMap<String, u64>>) -> BTreeMap<String, u64> {
        map.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn connect_took(&self, us: u64) {
        let mut h = self
            .connect_latency
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(h) = h.as_mut() {
            h.saturating_record(us.max(1));
        }
    }
}

/// Everything the clients share.
pub struct Ctx {
    pub plan: Plan,
    pub transport: Transport,
    pub targets: Vec<Target>,
    pub binds: Vec<IpAddr>,
    /// Extra headers on every websocket handshake.
    pub headers: Vec<Header>,
    /// Each client's token (empty outside this shard), when tokens are used.
    pub tokens: Vec<String>,
    pub token_in: TokenIn,
    /// Room names as JSON strings, by room index.
    pub room_json: Vec<String>,
    /// Joined members per room, counted as joins succeed.
    pub room_joined: Vec<AtomicU64>,
    pub pad: String,
    /// Time between two publishes of one sender slot.
    pub send_interval: Option<Duration>,
    pub count: Option<u64>,
    pub max_inflight: usize,
    pub connect_timeout: Duration,
    pub join_timeout: Duration,
    pub connect_gate: Semaphore,
    pub stats: Stats,
    pub recorder: Recorder,
    pub phase: watch::Receiver<Phase>,
    pub clock: Clock,
}

/// What a client hands back when the run ends.
#[derive(Debug, Default)]
pub struct Outcome {
    pub connected: bool,
    pub ledger: ClientLedger,
    /// (room, offset) of every publish acked ok.
    pub acked: Vec<(u32, u64)>,
    /// Publishes whose ack never came.
    pub unacked: u64,
}

struct Pending {
    room: u32,
    sent_us: u64,
}

struct Client<'a> {
    ctx: &'a Ctx,
    idx: usize,
    ws: Ws,
    next_ack: u64,
    /// Join acks awaited: ack id → room.
    joining: HashMap<u64, u32>,
    pending: HashMap<u64, Pending>,
    outcome: Outcome,
    seq: u64,
}

/// Runs client `idx` until the run is done or its connection ends.
pub async fn run(ctx: &Ctx, idx: usize) -> Outcome {
    let ws = {
        let Ok(_permit) = ctx.connect_gate.acquire().await else {
            return Outcome::default();
        };
        let started = ctx.clock.elapsed_us();
        ctx.stats
            .first_connect_us
            .fetch_min(started, Ordering::Relaxed);
        let result = match tokio::time::timeout(ctx.connect_timeout, connect(ctx, idx)).await {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Timeout),
        };
        match result {
            Ok(ws) => {
                let done = ctx.clock.elapsed_us();
                ctx.stats.last_connect_us.fetch_max(done, Ordering::Relaxed);
                ctx.stats.connect_took(done.saturating_sub(started));
                ctx.stats.connected.fetch_add(1, Ordering::Relaxed);
                ws
            }
            Err(e) => {
                ctx.stats.connect_failed.fetch_add(1, Ordering::Relaxed);
                Stats::count(&ctx.stats.failures, e.reason());
                return Outcome::default();
            }
        }
    };
    let mut client = Client {
        ctx,
        idx,
        ws,
        next_ack: 1,
        joining: HashMap::new(),
        pending: HashMap::new(),
        outcome: Outcome {
            connected: true,
            ..Outcome::default()
        },
        seq: 0,
    };
    let joined = match tokio::time::timeout(ctx.join_timeout, client.join_all()).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::JoinTimeout),
    };
    match joined {
        Ok(()) => {
            ctx.stats.joined.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            if e.is_join() {
                ctx.stats.join_failed.fetch_add(1, Ordering::Relaxed);
            } else {
                ctx.stats.disconnected.fetch_add(1, Ordering::Relaxed);
                ctx.stats.join_failed.fetch_add(1, Ordering::Relaxed);
            }
            Stats::count(&ctx.stats.failures, e.reason());
            return client.outcome;
        }
    }
    client.serve().await;
    client.outcome.unacked = client.pending.len() as u64;
    client.outcome
}

async fn connect(ctx: &Ctx, idx: usize) -> Result<Ws, ConnectError> {
    let target = &ctx.targets[ctx.plan.url_of(idx)];
    let socket = match target.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(ConnectError::Socket)?;
    if !ctx.binds.is_empty() {
        let ip = ctx.binds[idx % ctx.binds.len()];
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(ConnectError::Bind)?;
    }
    let stream = socket
        .connect(target.addr)
        .await
        .map_err(ConnectError::Tcp)?;
    let _ = stream.set_nodelay(true);
    let token = ctx
        .tokens
        .get(idx)
        .filter(|t| !t.is_empty())
        .map(String::as_str);
    let url = match ctx.transport {
        Transport::Sio => {
            let mut url = format!(
                "ws://{}/socket.io/?EIO=4&transport=websocket",
                target.authority
            );
            if let (Some(token), TokenIn::Query) = (token, ctx.token_in) {
                url.push_str("&token=");
                url.push_str(token);
            }
            url
        }
        Transport::Ws => match token {
            Some(token) => format!("ws://{}/ws?token={token}", target.authority),
            None => format!("ws://{}/ws", target.authority),
        },
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(16 * 1024);
    let mut request = url.into_client_request().map_err(ConnectError::from_ws)?;
    for (name, value) in &ctx.headers {
        request.headers_mut().append(name, value.clone());
    }
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .map_err(ConnectError::from_ws)?;
    if ctx.transport == Transport::Sio {
        expect_sio(&mut ws, |f| matches!(f, Frame::Open)).await?;
        let auth = match ctx.token_in {
            TokenIn::Auth => token,
            TokenIn::Query => None,
        };
        ws.send(Message::text(proto::sio_connect(auth)))
            .await
            .map_err(|e| ConnectError::Handshake(e.to_string()))?;
        expect_sio(&mut ws, |f| matches!(f, Frame::Connected)).await?;
    }
    Ok(ws)
}

/// Reads Socket.IO frames until one `wanted` arrives, answering pings.
async fn expect_sio(ws: &mut Ws, wanted: impl Fn(&Frame<'_>) -> bool) -> Result<(), ConnectError> {
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | None => return Err(ConnectError::Closed),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(ConnectError::Handshake(e.to_string())),
        };
        let frame = proto::parse_sio(text.as_str())
            .map_err(|e| ConnectError::Protocol(format!("{e} in {:?}", truncate(&text, 80))))?;
        if wanted(&frame) {
            return Ok(());
        }
        match frame {
            Frame::ConnectError(message) => return Err(ConnectError::Refused(message)),
            Frame::Closed => return Err(ConnectError::Closed),
            Frame::Ping => {
                ws.send(Message::text("3"))
                    .await
                    .map_err(|e| ConnectError::Handshake(e.to_string()))?;
            }
            _ => {}
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Waits for the next phase; `None` when the coordinator is gone.
async fn next_phase(mut rx: watch::Receiver<Phase>) -> (watch::Receiver<Phase>, Option<Phase>) {
    let next = match rx.changed().await {
        Ok(()) => Some(*rx.borrow_and_update()),
        Err(_) => None,
    };
    (rx, next)
}

fn close_reason(frame: Option<&tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        Some(f) => format!(
            "closed by the server: {} {}",
            u16::from(f.code),
            truncate(&f.reason, 60)
        ),
        None => "closed by the server".to_owned(),
    }
}

impl Client<'_> {
    fn parse<'t>(&self, text: &'t str) -> Result<Frame<'t>, proto::ProtoError> {
        match self.ctx.transport {
            Transport::Sio => proto::parse_sio(text),
            Transport::Ws => proto::parse_ws(text),
        }
    }

    async fn send(&mut self, text: String) -> Result<(), tungstenite::Error> {
        self.ws.send(Message::text(text)).await
    }

    async fn join_all(&mut self) -> Result<(), ConnectError> {
        let ctx = self.ctx;
        for &room in &ctx.plan.client_rooms[self.idx] {
            let ack = self.next_ack;
            self.next_ack += 1;
            let room_json = &ctx.room_json[room as usize];
            let text = match ctx.transport {
                Transport::Sio => proto::sio_join(ack, room_json),
                Transport::Ws => proto::ws_join(ack, room_json),
            };
            self.joining.insert(ack, room);
            self.send(text)
                .await
                .map_err(|e| ConnectError::Join(e.to_string()))?;
        }
        while !self.joining.is_empty() {
            let text = match self.ws.next().await {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(frame))) => {
                    return Err(ConnectError::Join(close_reason(frame.as_ref())));
                }
                None => return Err(ConnectError::Join("connection closed".into())),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(ConnectError::Join(e.to_string())),
            };
            match self.parse(text.as_str()) {
                Ok(Frame::Ack { id, reply }) => {
                    let Some(room) = self.joining.remove(&id) else {
                        continue;
                    };
                    match (reply.ok, reply.offset) {
                        (true, Some(offset)) => {
                            self.outcome.ledger.rooms.push(Membership {
                                room,
                                received: OffsetSet::new(offset),
                            });
                            ctx.room_joined[room as usize].fetch_add(1, Ordering::Relaxed);
                        }
                        (true, None) => {
                            return Err(ConnectError::Join("ack without offset".into()));
                        }
                        (false, _) => {
                            return Err(ConnectError::Join(
                                reply.error.unwrap_or_else(|| "refused".into()),
                            ));
                        }
                    }
                }
                Ok(Frame::Ping) => {
                    self.send("3".into())
                        .await
                        .map_err(|e| ConnectError::Join(e.to_string()))?;
                }
                Ok(Frame::Closed) => {
                    return Err(ConnectError::Join("session closed by the server".into()));
                }
                Ok(Frame::Delivery(d)) => {
                    // Someone else's traffic in a room being joined: account for it.
                    self.on_delivery(&d.room, d.offset, d.probe);
                }
                Ok(_) => {}
                Err(_) => {
                    self.ctx.stats.unreadable.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Reads until the run is done, publishing while it runs.
    async fn serve(&mut self) {
        let ctx = self.ctx;
        let mut phase_rx = ctx.phase.clone();
        let mut phase = *phase_rx.borrow_and_update();
        // One pending `changed()` for the whole loop (a new one per frame costs a Notified
        // registration each time); it is renewed only when the phase changes.
        let mut changed = Box::pin(next_phase(phase_rx));
        let sends = &ctx.plan.client_sends[self.idx];
        let period = match (ctx.send_interval, sends.len()) {
            (Some(interval), n) if n > 0 => Some(interval / n as u32),
            _ => None,
        };
        let limit = ctx.count.map(|c| c * sends.len() as u64);
        let mut ticker: Option<tokio::time::Interval> = None;
        let mut finished = false;
        loop {
            if phase == Phase::Run
                && ticker.is_none()
                && !finished
                && let Some(period) = period
            {
                // Spread the senders' first ticks over one period.
                let frac = (self.idx.wrapping_mul(7919) % 1000) as f64 / 1000.0;
                let start = tokio::time::Instant::now() + period.mul_f64(frac);
                let mut t = tokio::time::interval_at(start, period.max(Duration::from_micros(1)));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                ticker = Some(t);
            }
            let tick = async {
                match ticker.as_mut() {
                    Some(t) if phase == Phase::Run => {
                        t.tick().await;
                    }
                    _ => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                biased;
                (rx, next) = &mut changed => {
                    let Some(next) = next else {
                        break;
                    };
                    phase = next;
                    if phase == Phase::Done {
                        break;
                    }
                    changed = Box::pin(next_phase(rx));
                }
                () = tick => {
                    if let Err(e) = self.publish(sends).await {
                        self.disconnected(format!("send failed: {e}"));
                        break;
                    }
                    if limit.is_some_and(|l| self.seq >= l) {
                        ctx.stats.senders_done.fetch_add(1, Ordering::Relaxed);
                        ticker = None;
                        finished = true;
                    }
                }
                frame = self.ws.next() => {
                    let text = match frame {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(frame))) => {
                            self.disconnected(close_reason(frame.as_ref()));
                            break;
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => {
                            self.disconnected(format!("read failed: {e}"));
                            break;
                        }
                        None => {
                            self.disconnected("connection closed".to_owned());
                            break;
                        }
                    };
                    if let Err(e) = self.on_text(text.as_str()).await {
                        self.disconnected(format!("send failed: {e}"));
                        break;
                    }
                }
            }
        }
        // Send a close frame so the server sees a clean goodbye, without waiting long.
        let _ = tokio::time::timeout(Duration::from_millis(200), self.ws.close(None)).await;
    }

    fn disconnected(&mut self, reason: String) {
        self.ctx.stats.disconnected.fetch_add(1, Ordering::Relaxed);
        Stats::count(&self.ctx.stats.disconnects, reason);
    }

    async fn publish(&mut self, sends: &[u32]) -> Result<(), tungstenite::Error> {
        let ctx = self.ctx;
        if self.pending.len() >= ctx.max_inflight {
            ctx.stats.throttled.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let room = sends[(self.seq % sends.len() as u64) as usize];
        let ack = self.next_ack;
        self.next_ack += 1;
        let sent_us = ctx.clock.now_us();
        let probe = Probe {
            t: sent_us,
            s: self.idx as u64,
            n: self.seq,
        };
        self.seq += 1;
        let data = proto::probe_data(probe, &ctx.pad);
        let room_json = &ctx.room_json[room as usize];
        let text = match ctx.transport {
            Transport::Sio => proto::sio_message(ack, room_json, &data),
            Transport::Ws => proto::ws_message(ack, room_json, &data),
        };
        self.pending.insert(ack, Pending { room, sent_us });
        ctx.stats.sent.fetch_add(1, Ordering::Relaxed);
        self.send(text).await
    }

    async fn on_text(&mut self, text: &str) -> Result<(), tungstenite::Error> {
        let ctx = self.ctx;
        match self.parse(text) {
            Ok(Frame::Delivery(d)) => self.on_delivery(&d.room, d.offset, d.probe),
            Ok(Frame::Ack { id, reply }) => {
                let Some(pending) = self.pending.remove(&id) else {
                    return Ok(());
                };
                ctx.recorder
                    .ack(self.idx, ctx.clock.now_us().saturating_sub(pending.sent_us));
                match (reply.ok, reply.offset) {
                    (true, Some(offset)) => {
                        self.outcome.acked.push((pending.room, offset));
                        let members =
                            ctx.room_joined[pending.room as usize].load(Ordering::Relaxed);
                        ctx.stats.expected.fetch_add(members, Ordering::Relaxed);
                        ctx.stats.acked_ok.fetch_add(1, Ordering::Relaxed);
                    }
                    (ok, _) => {
                        ctx.stats.ack_failed.fetch_add(1, Ordering::Relaxed);
                        let reason = match (ok, reply.error) {
                            (_, Some(error)) => error,
                            (true, None) => "ack without offset".to_owned(),
                            (false, None) => "refused".to_owned(),
                        };
                        Stats::count(&ctx.stats.ack_errors, reason);
                    }
                }
            }
            Ok(Frame::Ping) => return self.send("3".into()).await,
            Ok(Frame::Closed) => {
                self.disconnected("session closed by the server".to_owned());
            }
            Ok(_) => {}
            Err(_) => {
                ctx.stats.unreadable.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn on_delivery(&mut self, room_name: &str, offset: u64, probe: Option<Probe>) {
        let ctx = self.ctx;
        let room = ctx.plan.client_rooms[self.idx]
            .iter()
            .copied()
            .find(|r| ctx.plan.room_names[*r as usize] == room_name)
            .unwrap_or(u32::MAX);
        match self.outcome.ledger.record(room, offset) {
            Insert::New => {
                if let Some(probe) = probe {
                    let latency = ctx.clock.now_us().saturating_sub(probe.t);
                    let sender = probe.s as usize;
                    let cross = ctx.plan.shape.urls > 1
                        && sender < ctx.plan.shape.clients
                        && ctx.plan.url_of(sender) != ctx.plan.url_of(self.idx);
                    ctx.recorder
                        .delivery(self.idx, latency, cross, sender == self.idx);
                }
            }
            Insert::Duplicate => ctx.recorder.duplicate(self.idx),
            Insert::Stale | Insert::OutOfRange => {}
        }
    }
}
