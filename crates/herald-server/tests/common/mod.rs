//! A herald server on 127.0.0.1:0 inside the test process, and a plain-WebSocket client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use herald_core::testsuite;
use herald_server::config::{Config, Secret};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "integration-test-secret";
pub const API_KEY: &str = "integration-api-key";

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let data_dir = testsuite::temp_dir("herald-test-", &herald_server::random_id(10));
        let mut config = Config {
            jwt_secret: Some(Secret::new(SECRET)),
            api_key: Some(Secret::new(API_KEY)),
            instance_id: "rust-test".into(),
            data_dir,
            shutdown_timeout: Duration::from_secs(5),
            // Every test connects from 127.0.0.1; the tests of the limit set it.
            ip_connect_rate: 0,
            ..Config::default()
        };
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(herald_server::run(listener, config, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Begins the graceful shutdown and returns the server task to await.
    pub fn shutdown(mut self) -> JoinHandle<anyhow::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let (_, task) = (self.stop, self.task);
        task
    }
}

/// Asserts that an error body or ack names `code` and that its message says `says`: what a
/// client shows its user.
pub fn assert_refused(body: &Value, code: &str, says: &str) {
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains(says)),
        "the message should say {says:?}: {body}"
    );
}

pub fn token(sub: &str) -> String {
    token_with(sub, None)
}

pub fn token_with(sub: &str, rooms: Option<Vec<String>>) -> String {
    herald_server::auth::mint(&Secret::new(SECRET), sub, rooms, Duration::from_secs(600))
        .expect("mint")
}

pub struct WsClient {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Pushed frames read while waiting for an ack, kept in order.
    pub pushed: Vec<Value>,
}

impl WsClient {
    /// Connects to `/ws` as `sub` and reads the `session` event.
    pub async fn connect(server: &TestServer, sub: &str) -> (Self, Value) {
        let url = format!("ws://{}/ws?token={}", server.addr, token(sub));
        Self::connect_url(&url).await
    }

    pub async fn connect_url(url: &str) -> (Self, Value) {
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connect");
        let mut client = Self {
            stream,
            next_id: 0,
            pushed: Vec::new(),
        };
        let session = client.recv().await;
        assert_eq!(session["type"], "event");
        assert_eq!(session["event"], "session");
        (client, session["data"].clone())
    }

    /// A client on an open socket, once its `session` event has arrived.
    pub async fn from_stream(stream: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Self {
        let mut client = Self {
            stream,
            next_id: 0,
            pushed: Vec::new(),
        };
        let session = client.recv().await;
        assert_eq!(session["event"], "session");
        client
    }

    /// The underlying socket, to read and write frames directly.
    pub fn into_stream(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.stream
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.stream.send(Message::text(text)).await.expect("send");
    }

    /// Sends a frame with a fresh id and returns its ack; pushed frames meanwhile are kept.
    pub async fn request(&mut self, mut frame: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        frame["id"] = json!(id);
        self.send_raw(&frame.to_string()).await;
        loop {
            let frame = self.recv().await;
            if frame["type"] == "ack" && frame["id"] == json!(id) {
                return frame;
            }
            self.pushed.push(frame);
        }
    }

    /// The next frame, within 5 s.
    pub async fn recv(&mut self) -> Value {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), self.stream.next())
                .await
                .expect("a frame within 5s")
                .expect("the connection is open")
                .expect("a readable frame");
            match next {
                Message::Text(text) => {
                    return serde_json::from_str(text.as_str()).expect("json frame");
                }
                Message::Close(frame) => panic!("connection closed: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// The next pushed frame of `kind`, taking kept ones first.
    pub async fn next_pushed(&mut self, kind: &str) -> Value {
        if let Some(i) = self.pushed.iter().position(|f| f["type"] == kind) {
            return self.pushed.remove(i);
        }
        loop {
            let frame = self.recv().await;
            if frame["type"] == kind {
                return frame;
            }
            self.pushed.push(frame);
        }
    }

    /// Reads until the server closes, returning the close code and reason.
    pub async fn closed(&mut self) -> (u16, String) {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), self.stream.next())
                .await
                .expect("a close within 5s");
            match next {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (frame.code.into(), frame.reason.to_string());
                }
                Some(Ok(Message::Close(None))) | None => return (1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("read error before close: {e}"),
            }
        }
    }
}

// Fleets of herald processes.

pub const FLEET_API_KEY: &str = "fleet-api-key";

/// One herald process.
pub struct Instance {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Instance {
    pub fn start(redis: &str, key: &str, id: &str, env: &[(&str, &str)]) -> Self {
        let fleet = [("REDIS_URL", redis), ("HERALD_REDIS_KEY", key)];
        Self::launch(id, &[&fleet[..], env].concat())
    }

    /// One herald process serving alone, in memory.
    pub fn alone(id: &str, env: &[(&str, &str)]) -> Self {
        Self::launch(id, env)
    }

    fn launch(id: &str, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PORT", "0")
            .env("HERALD_HOST", "127.0.0.1")
            .env("JWT_SECRET", SECRET)
            .env("HERALD_API_KEY", FLEET_API_KEY)
            .env("INSTANCE_ID", id)
            // Every test connects from 127.0.0.1; the tests of the limit set it.
            .env("HERALD_IP_CONNECT_RATE", "0")
            .env("HERALD_SHUTDOWN_TIMEOUT", "3s")
            .env("RUST_LOG", "info")
            .env(
                "HERALD_DATA_DIR",
                testsuite::temp_dir("herald-fleet-", &herald_server::random_id(8)),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start herald");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line
                    .split("addr=")
                    .nth(1)
                    .filter(|_| line.contains("listening"))
                {
                    let _ = tx.send(
                        addr.split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_owned(),
                    );
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("herald listening within 20s");
        Self {
            child,
            addr: addr.parse().expect("listening address"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn client(&self, sub: &str) -> WsClient {
        WsClient::connect_url(&format!("ws://{}/ws?token={}", self.addr, token(sub)))
            .await
            .0
    }

    pub async fn ready(&self) -> bool {
        reqwest::get(self.url("/ready"))
            .await
            .is_ok_and(|r| r.status() == 200)
    }

    pub async fn wait_ready(&self, want: bool) {
        for _ in 0..200 {
            if self.ready().await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} never became ready={want}", self.addr);
    }

    /// The process's resident memory, in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line")
    }

    pub async fn metric(&self, name: &str) -> f64 {
        metric_at(&self.url("/metrics"), name).await
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn prefix() -> String {
    format!("fleet-{}", herald_server::random_id(10))
}

pub async fn fleet(n: usize, env: &[(&str, &str)]) -> Vec<Instance> {
    fleet_on(&testsuite::redis_url(), &prefix(), n, env).await
}

/// `n` instances on `redis` under the key prefix `key`, each ready.
pub async fn fleet_on(redis: &str, key: &str, n: usize, env: &[(&str, &str)]) -> Vec<Instance> {
    let fleet: Vec<Instance> = (0..n)
        .map(|i| Instance::start(redis, key, &format!("i{i}"), env))
        .collect();
    for instance in &fleet {
        instance.wait_ready(true).await;
    }
    fleet
}

/// Stops the Redis on `port` at once, without saving, as a crash would.
pub fn crash_redis(port: u16) {
    let stop = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "shutdown", "nosave"])
        .status();
    assert!(stop.is_ok(), "redis-cli must be on PATH");
}

/// The sum of every series of the Prometheus metric `name` (a prefix such as
/// `herald_connections{`) served at `metrics_url`.
pub async fn metric_at(metrics_url: &str, name: &str) -> f64 {
    let text = reqwest::get(metrics_url)
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
