//! The durable path end to end: messages reach SQLite (embedded) or PostgreSQL (a fleet on
//! Redis) exactly once, through a killed worker and a database outage, and old history is
//! served from the store.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{API_KEY, Instance, TestServer, WsClient, prefix, token};
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
    writer
        .request(json!({"type": "join", "room": "kept"}))
        .await;
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
        store.history(&key, all).await.map(|m| m.len()).unwrap_or(0) == 150
    })
    .await;
    let rows = store.history(&key, all).await.expect("rows");
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

struct WorkerProcess(Child);

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
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start herald worker");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("persist worker started") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("worker starts within 20s");
        Self(child)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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
    let database = herald_store::testing::postgres_url().await;
    let (redis, key) = (testsuite::redis_url(), prefix());
    let env = [
        ("DATABASE_URL", database.as_str()),
        ("HERALD_WORKER", "off"),
    ];
    let fleet: Vec<Instance> = (0..2)
        .map(|i| Instance::start(&redis, &key, &format!("d{i}"), &env))
        .collect();
    for instance in &fleet {
        instance.wait_ready(true).await;
    }
    let doomed = WorkerProcess::start(&redis, &key, &database, "doomed");

    // The database goes away: the worker reads batches it cannot store, and holds them.
    allow_connections(&database, false).await;
    fleet[0].wait_ready(false).await; // the store is unreachable: not ready
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
    let total = 300;
    for i in 0..total {
        let client = &mut clients[i % 2];
        let ack = client
            .request(json!({"type": "message", "room": "durable", "data": i}))
            .await;
        assert_eq!(ack["ok"], true, "{ack}");
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
    drop(doomed); // kill -9, mid-retry, with its entries pending

    allow_connections(&database, true).await;
    fleet[0].wait_ready(true).await;
    let _rescuer = WorkerProcess::start(&redis, &key, &database, "rescuer");
    eventually("300 rows", || async {
        rows(&database, "durable").await.0 == total as i64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await; // nothing more arrives later
    assert_eq!(
        rows(&database, "durable").await,
        (total as i64, total as i64),
        "exactly once"
    );

    let store = herald_store::PostgresStore::connect(&database)
        .await
        .expect("store");
    let key = RoomKey::new(Namespace::root(), RoomName::new("durable").expect("room"));
    let stored = store
        .history(
            &key,
            HistoryQuery {
                since: Some(0),
                before: None,
                limit: 1000,
            },
        )
        .await
        .expect("rows");
    let offsets: Vec<u64> = stored.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, (1..=total as u64).collect::<Vec<_>>());
}
