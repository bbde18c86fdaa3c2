//! Several herald processes on one real Redis: ordering, exactly-once delivery, user-targeted
//! publishes, recovery on another instance, presence across instances and after `kill -9`,
//! per-room subscriptions, a Redis restart, and pub/sub connections killed or silently dead.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{FLEET_API_KEY as API_KEY, Instance, WsClient, crash_redis, fleet, fleet_on, prefix};
use herald_core::testsuite;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_gets_every_message_once_in_one_order() {
    let fleet = fleet(3, &[]).await;
    let mut clients = Vec::new();
    for (i, instance) in fleet.iter().enumerate() {
        for j in 0..2 {
            let mut client = instance.client(&format!("u{i}{j}")).await;
            assert_eq!(
                client
                    .request(json!({"type": "join", "room": "order"}))
                    .await["ok"],
                true
            );
            clients.push(client);
        }
    }
    let per_client = 15;
    let publishers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, mut client)| {
            tokio::spawn(async move {
                for i in 0..per_client {
                    let ack = client
                        .request(json!({"type": "message", "room": "order", "data": [c, i]}))
                        .await;
                    assert_eq!(ack["ok"], true, "{ack}");
                }
                client
            })
        })
        .collect();
    let mut clients = Vec::new();
    for p in publishers {
        clients.push(p.await.expect("publisher"));
    }
    let total = 6 * per_client;
    let mut sequences = Vec::new();
    for client in &mut clients {
        let mut seen = Vec::new();
        while seen.len() < total {
            let m = client.next_pushed("message").await;
            seen.push((m["offset"].as_u64().expect("offset"), m["id"].clone()));
        }
        let offsets: Vec<u64> = seen.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets,
            (1..=total as u64).collect::<Vec<_>>(),
            "each message once, in offset order"
        );
        sequences.push(seen);
    }
    assert!(
        sequences.windows(2).all(|w| w[0] == w[1]),
        "every client saw the same sequence"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_targeted_publish_reaches_the_user_on_every_instance() {
    let fleet = fleet(3, &[]).await;
    let mut tab1 = fleet[0].client("dana").await;
    let mut tab2 = fleet[2].client("dana").await;
    let mut other = fleet[1].client("erin").await;
    let response = reqwest::Client::new()
        .post(fleet[1].url("/api/publish"))
        .bearer_auth(API_KEY)
        .json(&json!({"user": "dana", "event": "ping", "data": {"n": 1}}))
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), 200);
    for tab in [&mut tab1, &mut tab2] {
        let event = tab.next_pushed("event").await;
        assert_eq!(
            event,
            json!({"type": "event", "event": "ping", "data": {"n": 1}})
        );
    }
    // erin is not dana: a marker proves nothing else arrived first.
    other
        .request(json!({"type": "join", "room": "marker"}))
        .await;
    other
        .request(json!({"type": "message", "room": "marker", "data": 0}))
        .await;
    let next = other.next_pushed("message").await;
    assert!(
        other.pushed.iter().all(|f| f["type"] != "event"),
        "{:?}",
        other.pushed
    );
    assert_eq!(next["room"], "marker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_moves_instance_recovers_by_offset() {
    let fleet = fleet(2, &[]).await;
    let mut writer = fleet[0].client("writer").await;
    writer
        .request(json!({"type": "join", "room": "move"}))
        .await;
    let mut reader = fleet[0].client("reader").await;
    reader
        .request(json!({"type": "join", "room": "move"}))
        .await;
    for i in 1..=3 {
        writer
            .request(json!({"type": "message", "room": "move", "data": i}))
            .await;
    }
    let mut last = 0;
    while last < 3 {
        last = reader.next_pushed("message").await["offset"]
            .as_u64()
            .expect("offset");
    }
    drop(reader);
    for i in 4..=6 {
        writer
            .request(json!({"type": "message", "room": "move", "data": i}))
            .await;
    }
    let mut moved = fleet[1].client("reader").await;
    let ack = moved
        .request(json!({"type": "join", "room": "move", "since": last}))
        .await;
    assert_eq!(ack["recovered"], true, "{ack}");
    let replayed: Vec<Value> = moved
        .pushed
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| f["data"].clone())
        .collect();
    assert_eq!(replayed, vec![json!(4), json!(5), json!(6)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_spans_instances_and_a_killed_instance_users_leave() {
    let mut fleet = fleet(2, &[("HERALD_PRESENCE_TTL", "2s")]).await;
    let mut bob = fleet[1].client("bob").await;
    bob.request(json!({"type": "join", "room": "lobby"})).await;
    let mut alice = fleet[0].client("alice").await;
    alice
        .request(json!({"type": "join", "room": "lobby"}))
        .await;
    let mut joins = Vec::new();
    while joins.len() < 2 {
        joins.push(bob.next_pushed("presence").await["user"].clone());
    }
    assert_eq!(joins, vec![json!("bob"), json!("alice")]);
    let ack = alice
        .request(json!({"type": "presence", "room": "lobby"}))
        .await;
    assert_eq!(
        ack["users"],
        json!(["alice", "bob"]),
        "both instances agree"
    );

    // kill -9: no clean shutdown, no leave from the dying instance.
    let dead = fleet.remove(0);
    drop(dead);
    let left = tokio::time::timeout(Duration::from_secs(10), bob.next_pushed("presence")).await;
    let left = left.expect("alice leaves within the presence TTL");
    assert_eq!(
        left,
        json!({"type": "presence", "room": "lobby", "user": "alice", "status": "leave"})
    );
    let ack = bob
        .request(json!({"type": "presence", "room": "lobby"}))
        .await;
    assert_eq!(ack["users"], json!(["bob"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_without_local_members_never_reaches_an_instance() {
    let fleet = fleet(2, &[]).await;
    let mut member = fleet[0].client("member").await;
    member
        .request(json!({"type": "join", "room": "quiet"}))
        .await;
    let before = fleet[1]
        .metric("herald_broker_receives_total{kind=\"room\"}")
        .await;
    for i in 0..10 {
        member
            .request(json!({"type": "message", "room": "quiet", "data": i}))
            .await;
    }
    let mut got = 0;
    while got < 10 {
        member.next_pushed("message").await;
        got += 1;
    }
    let received_here = fleet[0]
        .metric("herald_broker_receives_total{kind=\"room\"}")
        .await;
    assert!(
        received_here >= 10.0,
        "the member's instance receives the room: {received_here}"
    );
    let after = fleet[1]
        .metric("herald_broker_receives_total{kind=\"room\"}")
        .await;
    assert_eq!(
        after, before,
        "the other instance is not subscribed to the room"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_recovers_by_itself_when_redis_restarts() {
    let (url, port) = testsuite::start_redis();
    testsuite::wait_for_port(port);
    let key = prefix();
    let fleet = fleet_on(&url, &key, 2, &[]).await;
    let mut a = fleet[0].client("a").await;
    let mut b = fleet[1].client("b").await;
    a.request(json!({"type": "join", "room": "restart"})).await;
    b.request(json!({"type": "join", "room": "restart"})).await;

    crash_redis(port);
    for instance in &fleet {
        instance.wait_ready(false).await;
    }
    let ack = a
        .request(json!({"type": "message", "room": "restart", "data": "alone"}))
        .await;
    assert_eq!(
        ack["ok"], true,
        "local delivery goes on while Redis is away: {ack}"
    );

    testsuite::restart_redis(port, &[]);
    for instance in &fleet {
        instance.wait_ready(true).await;
    }
    let ack = b
        .request(json!({"type": "message", "room": "restart", "data": "back"}))
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let got = a.next_pushed("message").await;
    let got = if got["data"] == "alone" {
        a.next_pushed("message").await
    } else {
        got
    };
    assert_eq!(got["data"], "back", "cross-instance delivery is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_protected_redis_is_reached_with_redis_password() {
    let (url, port) = testsuite::start_redis_with(&["--requirepass", "s3cret-pass"]);
    testsuite::wait_for_port(port);
    let key = prefix();
    let locked = Instance::start(&url, &key, "nopass", &[]);
    let open = Instance::start(&url, &key, "pass", &[("REDIS_PASSWORD", "s3cret-pass")]);
    open.wait_ready(true).await;
    assert!(
        !locked.ready().await,
        "without the password the instance serves alone and is not ready"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_removes_presence_at_once() {
    let mut fleet = fleet(2, &[("HERALD_PRESENCE_TTL", "60s")]).await;
    let mut bob = fleet[1].client("bob").await;
    bob.request(json!({"type": "join", "room": "bye"})).await;
    let mut alice = fleet[0].client("alice").await;
    alice.request(json!({"type": "join", "room": "bye"})).await;
    while bob.next_pushed("presence").await["user"] != "alice" {}
    let leaving = fleet.remove(0);
    let terminated = Command::new("kill")
        .args(["-TERM", &leaving.child.id().to_string()])
        .status();
    assert!(terminated.is_ok_and(|s| s.success()));
    let left = tokio::time::timeout(Duration::from_secs(5), bob.next_pushed("presence")).await;
    let left = left.expect("alice leaves at once, long before the 60s TTL");
    assert_eq!(left["status"], "leave");
    assert_eq!(left["user"], "alice");
    drop(leaving);
}

/// Publishes from `from` until `to` receives one of those messages, and returns how long
/// that took. Publishes that fail while the fleet reconnects are retried; the ids of those
/// acknowledged are added to `acked`.
async fn until_delivered(
    from: &mut WsClient,
    to: &mut WsClient,
    room: &str,
    acked: &mut Vec<String>,
) -> Duration {
    let started = Instant::now();
    for n in 0.. {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "fleet delivery did not resume within 20s"
        );
        let ack = from
            .request(json!({"type": "message", "room": room, "data": {"probe": n}}))
            .await;
        if ack["ok"] != true {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        acked.push(ack["message_id"].as_str().expect("message id").to_owned());
        let deadline = Instant::now() + Duration::from_millis(300);
        while let Ok(m) = tokio::time::timeout_at(deadline.into(), to.next_pushed("message")).await
        {
            if m["data"]["probe"] == n {
                return started.elapsed();
            }
        }
    }
    unreachable!()
}

async fn pubsub_fleet(
    url: &str,
    extra: &[(&str, &str)],
    acked: &mut Vec<String>,
) -> (Vec<Instance>, WsClient, WsClient) {
    let key = prefix();
    let mut env = vec![("HERALD_REDIS_PROBE_INTERVAL", "300ms")];
    env.extend_from_slice(extra);
    let fleet = fleet_on(url, &key, 2, &env).await;
    let mut a = fleet[0].client("a").await;
    let mut b = fleet[1].client("b").await;
    a.request(json!({"type": "join", "room": "live"})).await;
    b.request(json!({"type": "join", "room": "live"})).await;
    until_delivered(&mut a, &mut b, "live", acked).await;
    (fleet, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pubsub_connection_is_replaced_and_fleet_delivery_resumes() {
    let (url, port) = testsuite::start_redis();
    testsuite::wait_for_port(port);
    let mut acked = Vec::new();
    let (fleet, mut a, mut b) = pubsub_fleet(&url, &[("HERALD_PERSIST", "off")], &mut acked).await;
    let killed = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "CLIENT", "KILL", "TYPE", "pubsub"])
        .output()
        .expect("redis-cli must be on PATH");
    let count = String::from_utf8_lossy(&killed.stdout);
    assert!(
        count.trim().parse::<u32>().is_ok_and(|n| n >= 2),
        "both instances' subscriptions killed: {count}"
    );
    let took = until_delivered(&mut a, &mut b, "live", &mut acked).await;
    assert!(took < Duration::from_secs(5), "resumed after {took:?}");
    for instance in &fleet {
        assert!(instance.metric("herald_redis_reconnects_total").await >= 1.0);
    }
}

/// A TCP proxy in front of Redis whose connections can be frozen: they stay open and
/// forward nothing, as a half-open connection or a stuck middlebox would.
struct FreezingProxy {
    port: u16,
    opened: Arc<AtomicU64>,
    frozen_below: Arc<AtomicU64>,
}

impl FreezingProxy {
    async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let opened = Arc::new(AtomicU64::new(0));
        let frozen_below = Arc::new(AtomicU64::new(0));
        let (count, frozen) = (opened.clone(), frozen_below.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let generation = count.fetch_add(1, Ordering::SeqCst);
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (upstream_read, upstream_write) = upstream.into_split();
                tokio::spawn(pump(
                    client_read,
                    upstream_write,
                    generation,
                    frozen.clone(),
                ));
                tokio::spawn(pump(
                    upstream_read,
                    client_write,
                    generation,
                    frozen.clone(),
                ));
            }
        });
        Self {
            port,
            opened,
            frozen_below,
        }
    }

    /// Every connection open now goes silent; later ones work.
    fn freeze(&self) {
        self.frozen_below
            .store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    generation: u64,
    frozen_below: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if generation < frozen_below.load(Ordering::SeqCst) {
            continue; // swallowed: the connection stays open and says nothing
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_pubsub_connection_is_found_by_the_probe_and_replaced() {
    let (_, port) = testsuite::start_redis();
    testsuite::wait_for_port(port);
    let proxy = FreezingProxy::start(port).await;
    let url = format!("redis://127.0.0.1:{}", proxy.port);
    let database = herald_store::testing::postgres_url().await;
    let env = [
        ("DATABASE_URL", database.as_str()),
        ("BATCH_TIMEOUT", "200ms"),
        ("HERALD_CLAIM_IDLE", "1s"),
    ];
    let mut acked = Vec::new();
    let (fleet, mut a, mut b) = pubsub_fleet(&url, &env, &mut acked).await;
    proxy.freeze();
    let took = until_delivered(&mut a, &mut b, "live", &mut acked).await;
    assert!(took < Duration::from_secs(10), "resumed after {took:?}");
    // The persist workers' connections froze too: they are replaced, and every acknowledged
    // message is stored once.
    let want: std::collections::BTreeSet<String> = acked.iter().cloned().collect();
    let mut stored = std::collections::BTreeSet::new();
    for _ in 0..300 {
        stored = stored_ids(&database, "live").await;
        if stored.len() >= want.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stored, want, "exactly the acknowledged messages are stored");
    for instance in &fleet {
        assert!(
            instance
                .metric("herald_redis_pubsub_probe_failures_total")
                .await
                >= 1.0,
            "the probe found the dead connection"
        );
    }
}

async fn stored_ids(database: &str, room: &str) -> std::collections::BTreeSet<String> {
    use sqlx::Connection;
    let Ok(mut conn) = sqlx::PgConnection::connect(database).await else {
        return Default::default();
    };
    sqlx::query_as::<_, (String,)>("SELECT id FROM messages WHERE room = $1")
        .bind(room)
        .fetch_all(&mut conn)
        .await
        .map(|rows| rows.into_iter().map(|(id,)| id).collect())
        .unwrap_or_default()
}
