//! The durable path end to end: messages reach SQLite (embedded) or PostgreSQL (a fleet on
//! Redis) exactly once, through a killed worker, a 30 s database outage and a Redis outage
//! under traffic; a read-only or locked SQLite store fails acks instead of lying; and old
//! history is served from the store.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    API_KEY, FLEET_API_KEY, Instance, TestServer, WsClient, assert_refused, crash_redis, fleet_on,
    metric_at, prefix, token,
};
use herald_core::{HistoryQuery, Namespace, RoomKey, RoomName, Store, testsuite};
use serde_json::{Value, json};
use sqlx::Connection;

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after 30s waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_messages_reach_sqlite_once_and_old_history_comes_from_it() {
    let dir = std::env::temp_dir().join(format!("herald-durable-{}", herald_server::random_id(8)));
    let data_dir = dir.clone();
    let server = TestServer::start_with(move |c| {
        c.data_dir = data_dir;
        c.history_size = 10;
        c.batch_size = 50;
        c.batch_timeout = Duration::from_millis(100);
    })
    .await;
    let (mut writer, _) = WsClient::connect(&server, "writer").await;
    let joined = writer
        .request(json!({"type": "join", "room": "kept"}))
        .await;
    let epoch = joined["epoch"].as_str().expect("an epoch").to_owned();
    for i in 1..=150 {
        let ack = writer
            .request(json!({"type": "message", "room": "kept", "data": {"i": i}}))
            .await;
        assert_eq!(ack["offset"], i);
    }
    let url = format!("sqlite://{}", dir.join("herald.db").display());
    let store = herald_store::SqliteStore::connect(&url)
        .await
        .expect("the server's sqlite file");
    let key = RoomKey::new(Namespace::root(), RoomName::new("kept").expect("room"));
    let all = HistoryQuery {
        since: Some(0),
        before: None,
        limit: 1000,
    };
    eventually("150 rows", || async {
        store
            .history(&key, &epoch, all)
            .await
            .map(|m| m.len())
            .unwrap_or(0)
            == 150
    })
    .await;
    let rows = store.history(&key, &epoch, all).await.expect("rows");
    assert!(
        rows.iter()
            .all(|m| m.instance.as_deref() == Some("rust-test")),
        "each row names the instance that published it"
    );
    let offsets: Vec<u64> = rows.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, (1..=150).collect::<Vec<_>>(), "every message once");

    // The broker keeps 10; the rest of the gap comes from the store.
    let (mut late, _) = WsClient::connect(&server, "late").await;
    let ack = late
        .request(json!({"type": "join", "room": "kept", "since": 0}))
        .await;
    assert_eq!(ack["recovered"], true, "{ack}");
    let replayed: Vec<Value> = late
        .pushed
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| f["offset"].clone())
        .collect();
    assert_eq!(replayed.len(), 150);
    assert_eq!(replayed.first(), Some(&json!(1)));
    let page: Value = reqwest::Client::new()
        .get(server.url("/api/rooms/kept/history?since=20&limit=5"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("history")
        .json()
        .await
        .expect("json");
    let offsets: Vec<&Value> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| &m["offset"])
        .collect();
    assert_eq!(
        offsets,
        [21, 22, 23, 24, 25]
            .map(Value::from)
            .iter()
            .collect::<Vec<_>>()
    );
}

struct WorkerProcess {
    child: Child,
    /// Where it serves /health, /ready and /metrics.
    url: String,
}

impl WorkerProcess {
    fn start(redis: &str, key: &str, database: &str, id: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("worker")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("REDIS_URL", redis)
            .env("HERALD_REDIS_KEY", key)
            .env("DATABASE_URL", database)
            .env("WORKER_ID", id)
            .env("BATCH_SIZE", "50")
            .env("BATCH_TIMEOUT", "200ms")
            .env("HERALD_CLAIM_IDLE", "1s")
            .env("HERALD_HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start herald worker");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut addr = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("worker listening") {
                    addr = line
                        .split("addr=")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .map(str::to_owned);
                }
                if line.contains("persist worker started")
                    && let Some(addr) = addr.take()
                {
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("worker starts within 20s");
        Self {
            child,
            url: format!("http://{addr}"),
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn rows(database: &str, room: &str) -> (i64, i64) {
    let Ok(mut conn) = sqlx::PgConnection::connect(database).await else {
        return (-1, -1);
    };
    sqlx::query_as("SELECT count(*), count(DISTINCT id) FROM messages WHERE room = $1")
        .bind(room)
        .fetch_one(&mut conn)
        .await
        .unwrap_or((-1, -1))
}

/// The epoch a room's offsets count in now, as the HTTP API reports it.
async fn room_epoch(instance: &Instance, room: &str) -> String {
    let page: Value = reqwest::Client::new()
        .get(instance.url(&format!("/api/rooms/{room}/history?limit=1")))
        .bearer_auth(FLEET_API_KEY)
        .send()
        .await
        .expect("history")
        .json()
        .await
        .expect("json");
    page["epoch"].as_str().expect("an epoch").to_owned()
}

async fn allow_connections(database: &str, allow: bool) {
    let (base, name) = database.rsplit_once('/').expect("database url");
    let mut admin = sqlx::PgConnection::connect(&format!("{base}/postgres"))
        .await
        .expect("admin connection");
    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS {allow}"))
        .execute(&mut admin)
        .await
        .expect("alter");
    if !allow {
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
            .bind(name)
            .execute(&mut admin)
            .await
            .expect("terminate");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_stores_every_message_once_through_a_killed_worker_and_a_database_outage() {
    const OUTAGE: Duration = Duration::from_secs(30);
    let database = herald_store::testing::postgres_url().await;
    let (redis, key) = (testsuite::redis_url(), prefix());
    let env = [
        ("DATABASE_URL", database.as_str()),
        ("HERALD_WORKER", "off"),
    ];
    let fleet = fleet_on(&redis, &key, 2, &env).await;
    let doomed = WorkerProcess::start(&redis, &key, &database, "doomed");

    // The database goes away: the worker reads batches it cannot store, and holds them.
    allow_connections(&database, false).await;
    let down = std::time::Instant::now();
    fleet[0].wait_ready(false).await; // the store is unreachable: not ready
    let body = ready_body(&fleet[0]).await;
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("store unavailable")),
        "/ready says why: {body}"
    );
    let mut clients = Vec::new();
    for (i, instance) in fleet.iter().enumerate() {
        let mut client = WsClient::connect_url(&format!(
            "ws://{}/ws?token={}",
            instance.addr,
            token(&format!("p{i}"))
        ))
        .await
        .0;
        client
            .request(json!({"type": "join", "room": "durable"}))
            .await;
        clients.push(client);
    }
    // Traffic on both instances for as long as the database is away: the stream holds it,
    // so every publish is acknowledged.
    let mut total = 0;
    while down.elapsed() < OUTAGE - Duration::from_secs(3) {
        let client = &mut clients[total % 2];
        let ack = client
            .request(json!({"type": "message", "room": "durable", "data": total}))
            .await;
        assert_eq!(ack["ok"], true, "{ack}");
        total += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stream = format!("herald:persist:{key}");
    eventually("the doomed worker to hold entries", || async {
        let out = Command::new("redis-cli")
            .args(["-u", &redis, "XPENDING", &stream, "persist-workers"])
            .output();
        out.ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u64>().ok()))
            .is_some_and(|pending| pending > 0)
    })
    .await;
    // What an operator sees on the worker: not ready, and retrying.
    let ready = reqwest::get(format!("{}/ready", doomed.url))
        .await
        .expect("the worker's /ready");
    assert_eq!(
        ready.status(),
        503,
        "the worker is not ready without its store"
    );
    eventually("the doomed worker to count retries", || async {
        metric_at(
            &format!("{}/metrics", doomed.url),
            "herald_worker_retries_total",
        )
        .await
            > 0.0
    })
    .await;
    drop(doomed); // kill -9, mid-retry, with its entries pending

    tokio::time::sleep(OUTAGE.saturating_sub(down.elapsed())).await;
    allow_connections(&database, true).await;
    fleet[0].wait_ready(true).await;
    let rescuer = WorkerProcess::start(&redis, &key, &database, "rescuer");
    eventually(&format!("{total} rows"), || async {
        rows(&database, "durable").await.0 == total as i64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await; // nothing more arrives later
    assert_eq!(
        rows(&database, "durable").await,
        (total as i64, total as i64),
        "exactly once"
    );
    let metrics = format!("{}/metrics", rescuer.url);
    assert_eq!(
        metric_at(&metrics, "herald_rows_written_total").await,
        total as f64,
        "the rescuer's /metrics counts the rows it wrote"
    );
    let ready = reqwest::get(format!("{}/ready", rescuer.url))
        .await
        .expect("the worker's /ready");
    assert_eq!(ready.status(), 200);

    let epoch = room_epoch(&fleet[0], "durable").await;
    let store = herald_store::PostgresStore::connect(&database)
        .await
        .expect("store");
    let key = RoomKey::new(Namespace::root(), RoomName::new("durable").expect("room"));
    let stored = store
        .history(
            &key,
            &epoch,
            HistoryQuery {
                since: Some(0),
                before: None,
                limit: 100_000,
            },
        )
        .await
        .expect("rows");
    let offsets: Vec<u64> = stored.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, (1..=total as u64).collect::<Vec<_>>());
}

/// Every message id of a room in the store, with how many rows there are in all.
async fn stored_ids(database: &str, room: &str) -> (usize, std::collections::BTreeSet<String>) {
    let Ok(mut conn) = sqlx::PgConnection::connect(database).await else {
        return (0, Default::default());
    };
    let ids: Vec<(String,)> = sqlx::query_as("SELECT id FROM messages WHERE room = $1")
        .bind(room)
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default();
    (ids.len(), ids.into_iter().map(|(id,)| id).collect())
}

async fn ready_body(instance: &Instance) -> Value {
    reqwest::get(instance.url("/ready"))
        .await
        .expect("ready")
        .json()
        .await
        .expect("json")
}

/// Publishes `data` to `room` and returns the ack.
async fn publish(client: &mut WsClient, room: &str, data: Value) -> Value {
    client
        .request(json!({"type": "message", "room": room, "data": data}))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_under_traffic_loses_no_acknowledged_message() {
    let database = herald_store::testing::postgres_url().await;
    let (redis, port) = testsuite::start_redis();
    testsuite::wait_for_port(port);
    let key = prefix();
    let env = [
        ("DATABASE_URL", database.as_str()),
        ("BATCH_TIMEOUT", "200ms"),
    ];
    let fleet = fleet_on(&redis, &key, 2, &env).await;
    let mut a = fleet[0].client("a").await;
    let mut a_peer = fleet[0].client("a-peer").await;
    let mut b = fleet[1].client("b").await;
    for client in [&mut a, &mut a_peer, &mut b] {
        client
            .request(json!({"type": "join", "room": "outage"}))
            .await;
    }
    let mut acked = std::collections::BTreeSet::new();
    for i in 0..20 {
        let client = if i % 2 == 0 { &mut a } else { &mut b };
        let ack = publish(client, "outage", json!({"phase": "before", "i": i})).await;
        assert_eq!(ack["ok"], true, "{ack}");
        acked.insert(ack["message_id"].as_str().expect("message id").to_owned());
    }
    // This Redis keeps nothing on disk: let the stream drain before it goes away.
    eventually("20 rows", || async {
        stored_ids(&database, "outage").await.0 == 20
    })
    .await;

    crash_redis(port);
    for instance in &fleet {
        instance.wait_ready(false).await;
        let body = ready_body(instance).await;
        assert!(
            body["reason"]
                .as_str()
                .is_some_and(|r| r.contains("redis unavailable")),
            "/ready says why: {body}"
        );
    }
    // Ten seconds of traffic on both instances while Redis is away.
    let outage = std::time::Instant::now();
    let mut from_a = 0;
    let mut alone_epoch = String::new();
    while outage.elapsed() < Duration::from_secs(10) {
        for (client, count) in [(&mut a, Some(&mut from_a)), (&mut b, None)] {
            let ack = publish(client, "outage", json!({"phase": "outage"})).await;
            assert_eq!(ack["ok"], true, "accepted while Redis is away: {ack}");
            acked.insert(ack["message_id"].as_str().expect("message id").to_owned());
            if let Some(count) = count {
                *count += 1;
                alone_epoch = ack["epoch"].as_str().expect("epoch").to_owned();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Local delivery went on: a's neighbour on the same instance got all of it.
    let mut seen = 0;
    while seen < from_a {
        let m = a_peer.next_pushed("message").await;
        if m["from"] == "a" && m["data"]["phase"] == "outage" {
            seen += 1;
        }
    }

    testsuite::restart_redis(port, &[]);
    for instance in &fleet {
        instance.wait_ready(true).await;
    }
    // The fleet resubscribed by itself: b hears a again.
    let ack = publish(&mut a, "outage", json!({"phase": "after"})).await;
    assert_eq!(ack["ok"], true, "{ack}");
    acked.insert(ack["message_id"].as_str().expect("message id").to_owned());
    while b.next_pushed("message").await["data"]["phase"] != "after" {}

    let total = acked.len();
    eventually(&format!("{total} rows"), || async {
        stored_ids(&database, "outage").await.0 >= total
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await; // nothing more arrives later
    let (rows, ids) = stored_ids(&database, "outage").await;
    assert_eq!(rows, total, "one row per acknowledged message");
    assert_eq!(ids, acked, "exactly the acknowledged messages");

    let mut conn = sqlx::PgConnection::connect(&database)
        .await
        .expect("database");
    let (epochs, unnamed): (i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT epoch), count(*) FILTER (WHERE instance IS NULL) FROM messages WHERE room = $1",
    )
    .bind("outage")
    .fetch_one(&mut conn)
    .await
    .expect("query");
    // Before, each instance alone, and after Redis restarted empty: offsets started over in
    // each, and no row displaced another.
    assert!(epochs >= 4, "{epochs} epochs");
    assert_eq!(unnamed, 0, "every row names its instance");

    // Offsets a client got while its instance was alone count in that epoch: recovery does
    // not mistake them for the fleet's, and history reads them back from the store.
    let mut late = fleet[0].client("late").await;
    let joined = late
        .request(json!({"type": "join", "room": "outage", "since": 1, "epoch": alone_epoch}))
        .await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_ne!(joined["epoch"], json!(alone_epoch));
    let page = late
        .request(json!({"type": "history", "room": "outage", "since": 0, "limit": 1000, "epoch": alone_epoch}))
        .await;
    let messages = page["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), from_a, "{page}");
    assert!(messages.iter().all(|m| m["from"] == "a"));
    assert_eq!(page["epoch"], json!(alone_epoch));
}

/// A server on an existing SQLite file at `dir`, with the persist worker batching quickly.
async fn embedded(dir: &std::path::Path, url: Option<String>) -> TestServer {
    let data_dir = dir.to_path_buf();
    TestServer::start_with(move |c| {
        c.data_dir = data_dir;
        c.database_url = url;
        c.batch_size = 10;
        c.batch_timeout = Duration::from_millis(100);
        c.persist_rooms = vec!["kept*".to_owned()];
    })
    .await
}

async fn server_ready(server: &TestServer) -> (bool, Value) {
    let response = reqwest::get(server.url("/ready")).await.expect("ready");
    let ok = response.status() == 200;
    (ok, response.json().await.expect("json"))
}

async fn sqlite_offsets(db: &std::path::Path, room: &str) -> Vec<i64> {
    let url = format!("sqlite://{}", db.display());
    let Ok(mut conn) = sqlx::SqliteConnection::connect(&url).await else {
        return Vec::new();
    };
    sqlx::query_as::<_, (i64,)>(r#"SELECT "offset" FROM messages WHERE room = ? ORDER BY "offset""#)
        .bind(room)
        .fetch_all(&mut conn)
        .await
        .map(|rows| rows.into_iter().map(|(o,)| o).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_sqlite_store_refuses_messages_clearly_and_the_server_stays_up() {
    let dir = std::env::temp_dir().join(format!("herald-ro-{}", herald_server::random_id(8)));
    let db = dir.join("herald.db");
    let first = embedded(&dir, None).await;
    let (mut writer, _) = WsClient::connect(&first, "writer").await;
    writer
        .request(json!({"type": "join", "room": "kept"}))
        .await;
    let ack = publish(&mut writer, "kept", json!("stored")).await;
    assert_eq!(ack["ok"], true, "{ack}");
    eventually("the first row", || async {
        sqlite_offsets(&db, "kept").await.len() == 1
    })
    .await;
    drop(writer);
    first.shutdown().await.expect("join").expect("clean stop");

    // The same file, read-only now.
    let server = embedded(&dir, Some(format!("sqlite://{}?mode=ro", db.display()))).await;
    eventually("/ready to say writes are refused", || async {
        let (ok, body) = server_ready(&server).await;
        !ok && body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("refused") && r.contains("readonly"))
    })
    .await;
    let (mut client, _) = WsClient::connect(&server, "client").await;
    let joined = client
        .request(json!({"type": "join", "room": "kept"}))
        .await;
    assert_eq!(joined["ok"], true, "{joined}");
    for _ in 0..3 {
        let ack = publish(&mut client, "kept", json!("lost?")).await;
        assert_eq!(
            ack["ok"], false,
            "never acked when it cannot be stored: {ack}"
        );
        // The reason reaches the user.
        assert_refused(&ack, "store_unavailable", "readonly");
    }
    // The server stays up: rooms that do not persist, and history, still work.
    client
        .request(json!({"type": "join", "room": "chat"}))
        .await;
    let ack = publish(&mut client, "chat", json!("hello")).await;
    assert_eq!(ack["ok"], true, "{ack}");
    let page = client
        .request(json!({"type": "history", "room": "kept"}))
        .await;
    assert_eq!(page["ok"], true, "{page}");
    let health = reqwest::get(server.url("/health")).await.expect("health");
    assert_eq!(health.status(), 200);
    assert!(!server.task.is_finished());
    assert_eq!(
        sqlite_offsets(&db, "kept").await,
        vec![1],
        "nothing was half-written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_store_that_stops_taking_writes_fails_acks_until_it_takes_them_again() {
    let dir = std::env::temp_dir().join(format!("herald-lock-{}", herald_server::random_id(8)));
    let db = dir.join("herald.db");
    let server = embedded(&dir, None).await;
    let (mut writer, _) = WsClient::connect(&server, "writer").await;
    writer
        .request(json!({"type": "join", "room": "kept"}))
        .await;
    let mut acked = 0;
    for i in 0..5 {
        let ack = publish(&mut writer, "kept", json!(i)).await;
        assert_eq!(ack["ok"], true, "{ack}");
        acked += 1;
    }
    eventually("5 rows", || async {
        sqlite_offsets(&db, "kept").await.len() == 5
    })
    .await;

    // Another process takes the write lock and keeps it: the store takes no writes.
    let mut holder = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .expect("second connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .expect("lock");
    let refused = loop {
        let ack = publish(&mut writer, "kept", json!("while locked")).await;
        if ack["ok"] == true {
            acked += 1; // queued before the worker learnt that the store refuses writes
            assert!(acked < 50, "never refused");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        break ack;
    };
    assert_eq!(refused["error"], "store_unavailable", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("locked")),
        "{refused}"
    );
    let (ok, body) = server_ready(&server).await;
    assert!(!ok, "not ready while the store refuses writes: {body}");
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let pending: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("herald_persist_pending "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the pending gauge");
    assert!(pending >= 1.0, "the held batch shows as pending: {pending}");

    sqlx::query("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("unlock");
    drop(holder);
    // The worker retries the held batch with backoff; once it lands, publishes are taken.
    let mut tries = 0;
    while publish(&mut writer, "kept", json!("back")).await["ok"] != true {
        tries += 1;
        assert!(tries < 300, "publishes never accepted again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    acked += 1;
    let (ok, body) = server_ready(&server).await;
    assert!(ok, "ready again: {body}");
    eventually(&format!("{acked} rows"), || async {
        sqlite_offsets(&db, "kept").await.len() == acked
    })
    .await;
    // Refused messages never took an offset: the stored ones are 1..=acked, each once.
    assert_eq!(
        sqlite_offsets(&db, "kept").await,
        (1..=acked as i64).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_published_through_redis_reaches_every_instance_in_order_and_postgres_once() {
    let database = herald_store::testing::postgres_url().await;
    let (redis, port) = testsuite::start_redis();
    testsuite::wait_for_port(port);
    let env = [
        ("DATABASE_URL", database.as_str()),
        ("BATCH_TIMEOUT", "200ms"),
    ];
    let fleet = fleet_on(&redis, &prefix(), 2, &env).await;
    let mut far = fleet[1].client("far").await;
    for room in ["bulk-a", "bulk-b"] {
        let ack = far.request(json!({"type": "join", "room": room})).await;
        assert_eq!(ack["ok"], true, "{ack}");
    }
    // More messages than one script call carries, in two rooms, with a refusal inside.
    let mut messages: Vec<Value> = (0..300)
        .map(|n| json!({"room": if n % 3 == 0 { "bulk-b" } else { "bulk-a" }, "data": {"n": n}}))
        .collect();
    messages.insert(150, json!({"room": "bad room!", "data": null}));
    let body: Value = reqwest::Client::new()
        .post(fleet[0].url("/api/publish"))
        .bearer_auth(FLEET_API_KEY)
        .json(&json!({ "messages": messages }))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 301);
    assert_eq!(results[150]["error"], "invalid_room", "{}", results[150]);
    assert_eq!(body["published"], 300);
    let offsets = |room: &str| -> Vec<u64> {
        messages
            .iter()
            .zip(results)
            .filter(|(m, r)| m["room"] == room && r["ok"] == true)
            .map(|(_, r)| r["offset"].as_u64().expect("offset"))
            .collect()
    };
    assert_eq!(offsets("bulk-a"), (1..=200).collect::<Vec<_>>());
    assert_eq!(offsets("bulk-b"), (1..=100).collect::<Vec<_>>());
    // The other instance delivers each room's messages in the batch's order (rooms are
    // ordered each on its own, not with each other).
    let mut seen: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for _ in 0..300 {
        let m = far.next_pushed("message").await;
        seen.entry(m["room"].as_str().expect("room").to_owned())
            .or_default()
            .push(m["data"]["n"].as_u64().expect("n"));
    }
    assert_eq!(
        seen["bulk-a"],
        (0..300).filter(|n| n % 3 != 0).collect::<Vec<_>>()
    );
    assert_eq!(seen["bulk-b"], (0..300).step_by(3).collect::<Vec<_>>());
    eventually("300 rows", || async {
        stored_ids(&database, "bulk-a").await.0 == 200
            && stored_ids(&database, "bulk-b").await.0 == 100
    })
    .await;
    let (rows_a, distinct_a) = rows(&database, "bulk-a").await;
    assert_eq!((rows_a, distinct_a), (200, 200), "each message stored once");
}
