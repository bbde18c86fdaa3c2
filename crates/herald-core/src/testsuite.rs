//! The shared engine test suites: every Broker and Presence implementation runs these.
//!
//! An engine crate invokes [`broker_test_suite!`](crate::broker_test_suite) or
//! [`presence_test_suite!`](crate::presence_test_suite) in a test module with an async factory
//! for a fresh engine; each test gets its own engine (and, for shared engines, its own keys).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::BoxFuture;
use crate::broker::{
    Broker, DeliverySink, HistoryQuery, LocalNode, LocalSocket, RemoteAction, Selector,
};
use crate::message::{Delivery, Payload, PresenceChange, PresenceStatus, Publication};
use crate::presence::Presence;
use crate::room::{ConnId, Namespace, RoomKey, RoomName, UserId};

/// A recorder as the broker's local node: it has no connections of its own.
pub struct RecorderNode(Recorder);

impl RecorderNode {
    pub fn node() -> (Arc<dyn LocalNode>, mpsc::UnboundedReceiver<Delivery>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(RecorderNode(Recorder(tx))), rx)
    }
}

impl DeliverySink for RecorderNode {
    fn deliver(&self, delivery: Delivery) -> BoxFuture<'_, ()> {
        self.0.deliver(delivery)
    }
}

impl LocalNode for RecorderNode {
    fn sockets(&self, _: &Namespace, _: &Selector) -> BoxFuture<'_, Vec<LocalSocket>> {
        Box::pin(std::future::ready(Vec::new()))
    }

    fn apply(&self, _: &Namespace, _: &Selector, _: RemoteAction) -> BoxFuture<'_, usize> {
        Box::pin(std::future::ready(0))
    }
}

/// A Redis for tests: `REDIS_URL` when set, otherwise a private `redis-server` (from PATH)
/// on a free port, started once per test process and stopped when that process exits.
pub fn redis_url() -> String {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("REDIS_URL") {
            return url;
        }
        let (url, port) = start_redis();
        wait_for_port(port);
        url
    })
    .clone()
}

/// Starts a private `redis-server` on a free port, watched by a shell that stops it when this
/// process exits. Returns its URL and port.
pub fn start_redis() -> (String, u16) {
    start_redis_with(&[])
}

/// [`start_redis`] with extra `redis-server` arguments, such as `--requirepass`.
pub fn start_redis_with(args: &[&str]) -> (String, u16) {
    let port = free_port();
    restart_redis(port, args);
    (format!("redis://127.0.0.1:{port}"), port)
}

/// Starts `redis-server` on `port` (again), stopped when this process exits.
pub fn restart_redis(port: u16, args: &[&str]) {
    let extra = args.join(" ");
    let script = format!(
        "(redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no {extra} & pid=$!; \
          while kill -0 {parent} 2>/dev/null; do sleep 1; done; kill $pid) >/dev/null 2>&1 &",
        parent = std::process::id()
    );
    let started = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .status();
    assert!(
        started.is_ok_and(|s| s.success()),
        "redis-server must be on PATH (or set REDIS_URL)"
    );
}

/// How old a test's temporary directory must be before a later test process removes it.
const STALE_TEMP: Duration = Duration::from_secs(3600);

/// A new directory under the system's temporary directory, named `{prefix}{unique}`.
///
/// A test cannot remove the directories it hands to a server (the server, or a store's pool,
/// outlives the test's scope), so each test process first removes, once per prefix, the
/// directories with that prefix that earlier runs left more than an hour ago: every run
/// would otherwise leave its data directories behind.
pub fn temp_dir(prefix: &str, unique: &str) -> std::path::PathBuf {
    static SWEPT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let root = std::env::temp_dir();
    let first = {
        let mut swept = SWEPT.lock().unwrap_or_else(|e| e.into_inner());
        let first = !swept.iter().any(|p| p == prefix);
        if first {
            swept.push(prefix.to_owned());
        }
        first
    };
    if first {
        remove_stale(&root, prefix, STALE_TEMP);
    }
    let dir = root.join(format!("{prefix}{unique}"));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Removes the entries of `root` named `{prefix}…` that were last modified over `age` ago.
pub fn remove_stale(root: &std::path::Path, prefix: &str, age: Duration) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|elapsed| elapsed > age);
        if stale && entry.file_name().to_string_lossy().starts_with(prefix) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits (up to 10 s) until something accepts connections on `port`.
pub fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on port {port} after 10s");
}

/// The history cap the broker factories are expected to use.
pub const HISTORY_SIZE: usize = 5;

/// A sink that records every delivery, for tests to read in order.
pub struct Recorder(mpsc::UnboundedSender<Delivery>);

impl Recorder {
    pub fn sink() -> (Arc<dyn DeliverySink>, mpsc::UnboundedReceiver<Delivery>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(Recorder(tx)), rx)
    }
}

impl DeliverySink for Recorder {
    fn deliver(&self, delivery: Delivery) -> BoxFuture<'_, ()> {
        // A test that stopped reading no longer cares about deliveries.
        let _ = self.0.send(delivery);
        Box::pin(std::future::ready(()))
    }
}

/// A room in the root namespace, unique to this test run.
pub fn key(room: &str) -> RoomKey {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = RoomName::new(&format!("{room}-{nanos:x}")).expect("valid test room");
    RoomKey::new(Namespace::root(), name)
}

/// History from after `offset`, up to `limit` messages.
pub fn since(offset: u64, limit: usize) -> HistoryQuery {
    HistoryQuery {
        since: Some(offset),
        before: None,
        limit,
    }
}

/// A publication to `key` with `data` as its JSON payload.
pub fn publication(key: &RoomKey, data: &str) -> Publication {
    Publication {
        key: key.clone(),
        id: format!("m-{data}"),
        from: UserId::new("tester"),
        data: RawValue::from_string(data.to_owned()).expect("valid test json"),
        ts: 1,
        persist: false,
        instance: None,
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Delivery>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a delivery within 5s")
        .expect("the broker is still delivering")
}

fn offsets(messages: &[Arc<crate::Message>]) -> Vec<u64> {
    messages.iter().map(|m| m.offset).collect()
}

pub async fn offsets_start_at_one_and_have_no_gaps(
    broker: Arc<dyn Broker>,
    mut rx: mpsc::UnboundedReceiver<Delivery>,
) {
    let key = key("offsets");
    let other = self::key("offsets-other");
    broker.subscribe(&key).await.expect("subscribe");
    broker.subscribe(&other).await.expect("subscribe");
    for i in 1..=3u64 {
        let m = broker
            .publish(publication(&key, &i.to_string()))
            .await
            .expect("publish");
        assert_eq!(m.offset, i);
    }
    let m = broker
        .publish(publication(&other, "9"))
        .await
        .expect("publish");
    assert_eq!(m.offset, 1, "each room counts on its own");
    let mut seen = Vec::new();
    for _ in 0..4 {
        if let Payload::Message(m) = next(&mut rx).await.payload
            && m.room == key.room
        {
            seen.push((m.offset, m.data.get().to_owned()));
        }
    }
    assert_eq!(
        seen,
        vec![(1, "1".into()), (2, "2".into()), (3, "3".into())]
    );
}

pub async fn concurrent_publishes_are_delivered_in_offset_order(
    broker: Arc<dyn Broker>,
    mut rx: mpsc::UnboundedReceiver<Delivery>,
) {
    let key = key("concurrent");
    broker.subscribe(&key).await.expect("subscribe");
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let broker = broker.clone();
            let p = publication(&key, &i.to_string());
            tokio::spawn(async move { broker.publish(p).await.expect("publish").offset })
        })
        .collect();
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.expect("publisher task"));
    }
    acked.sort_unstable();
    assert_eq!(acked, (1..=50).collect::<Vec<_>>());
    let mut delivered = Vec::new();
    while delivered.len() < 50 {
        if let Payload::Message(m) = next(&mut rx).await.payload {
            delivered.push(m.offset);
        }
    }
    assert_eq!(delivered, (1..=50).collect::<Vec<_>>());
}

pub async fn history_pages_by_since_and_before(
    broker: Arc<dyn Broker>,
    _rx: mpsc::UnboundedReceiver<Delivery>,
) {
    let key = key("history");
    for i in 1..=4 {
        broker
            .publish(publication(&key, &i.to_string()))
            .await
            .expect("publish");
    }
    let q = |since, before, limit| HistoryQuery {
        since,
        before,
        limit,
    };
    let page = broker
        .history(&key, q(Some(1), None, 100))
        .await
        .expect("history");
    assert_eq!(offsets(&page.messages), vec![2, 3, 4]);
    assert!(page.complete);
    assert_eq!(page.position.offset, 4);

    let page = broker
        .history(&key, q(Some(0), None, 2))
        .await
        .expect("history");
    assert_eq!(
        offsets(&page.messages),
        vec![1, 2],
        "oldest first after since"
    );
    assert!(
        !page.complete,
        "a page cut by its limit is not the whole gap"
    );

    let page = broker
        .history(&key, q(None, None, 2))
        .await
        .expect("history");
    assert_eq!(
        offsets(&page.messages),
        vec![3, 4],
        "newest when there is no since"
    );

    let page = broker
        .history(&key, q(None, Some(4), 2))
        .await
        .expect("history");
    assert_eq!(offsets(&page.messages), vec![2, 3]);

    let page = broker
        .history(&key, q(Some(1), Some(3), 100))
        .await
        .expect("history");
    assert_eq!(offsets(&page.messages), vec![2]);

    let page = broker
        .history(&key, q(Some(4), None, 100))
        .await
        .expect("history");
    assert!(page.messages.is_empty());
    assert!(page.complete, "nothing was missed");

    let page = broker
        .history(&key, q(Some(9), None, 100))
        .await
        .expect("history");
    assert!(
        !page.complete,
        "a since beyond the latest offset cannot be recovered"
    );

    let empty = broker
        .history(&self::key("never"), q(Some(0), None, 10))
        .await
        .expect("history");
    assert_eq!(empty.position.offset, 0);
    assert!(empty.messages.is_empty());
    assert!(empty.complete);
}

pub async fn history_is_capped_and_says_when_a_gap_is_lost(
    broker: Arc<dyn Broker>,
    _rx: mpsc::UnboundedReceiver<Delivery>,
) {
    let key = key("capped");
    let total = HISTORY_SIZE as u64 + 2;
    for i in 1..=total {
        broker
            .publish(publication(&key, &i.to_string()))
            .await
            .expect("publish");
    }
    let page = broker.history(&key, since(0, 100)).await.expect("history");
    assert_eq!(offsets(&page.messages), (3..=total).collect::<Vec<_>>());
    assert!(!page.complete, "offsets 1 and 2 were trimmed");

    // A short page from before the cap starts at the oldest message kept.
    let page = broker.history(&key, since(0, 2)).await.expect("history");
    assert_eq!(offsets(&page.messages), vec![3, 4]);
    assert!(!page.complete);

    let page = broker.history(&key, since(2, 100)).await.expect("history");
    assert!(page.complete, "everything after 2 is kept");
}

pub async fn events_and_presence_reach_the_room(
    broker: Arc<dyn Broker>,
    mut rx: mpsc::UnboundedReceiver<Delivery>,
) {
    let key = key("events");
    broker.subscribe(&key).await.expect("subscribe");
    let change = PresenceChange {
        room: key.room.clone(),
        user: UserId::new("u1"),
        status: PresenceStatus::Join,
    };
    broker
        .publish_presence(key.clone(), change.clone())
        .await
        .expect("presence");
    let data: Arc<RawValue> = RawValue::from_string("{\"a\":1}".into())
        .expect("json")
        .into();
    broker
        .emit(key.clone(), "alert".into(), data)
        .await
        .expect("emit");
    let first = next(&mut rx).await;
    assert_eq!(first.key, key);
    assert!(matches!(first.payload, Payload::Presence(ref c) if *c == change));
    match next(&mut rx).await.payload {
        Payload::Event { name, data } => {
            assert_eq!(&*name, "alert");
            assert_eq!(data.get(), "{\"a\":1}");
        }
        other => panic!("expected an event, got {other:?}"),
    }
    let page = broker.history(&key, since(0, 10)).await.expect("history");
    assert!(page.messages.is_empty(), "events are not recorded");
}

pub async fn presence_counts_users_not_connections(presence: Arc<dyn Presence>) {
    let key = key("presence");
    let (alice, bob) = (UserId::new("alice"), UserId::new("bob"));
    let (tab1, tab2, tab3) = (ConnId::new("c1"), ConnId::new("c2"), ConnId::new("c3"));
    assert!(
        presence.add(&key, &alice, &tab1).await.expect("add"),
        "first tab arrives"
    );
    assert!(
        !presence.add(&key, &alice, &tab2).await.expect("add"),
        "second tab is silent"
    );
    assert!(presence.add(&key, &bob, &tab3).await.expect("add"));
    assert_eq!(
        presence.users(&key).await.expect("users"),
        vec![alice.clone(), bob.clone()]
    );
    assert!(
        !presence.remove(&key, &alice, &tab1).await.expect("remove"),
        "a tab is left"
    );
    assert!(
        presence.remove(&key, &alice, &tab2).await.expect("remove"),
        "last tab leaves"
    );
    assert!(
        !presence.remove(&key, &alice, &tab2).await.expect("remove"),
        "leaves once"
    );
    assert_eq!(presence.users(&key).await.expect("users"), vec![bob]);
}

pub async fn presence_rooms_are_independent(presence: Arc<dyn Presence>) {
    let (a, b) = (key("presence-a"), key("presence-b"));
    let user = UserId::new("carol");
    let conn = ConnId::new("c1");
    assert!(presence.add(&a, &user, &conn).await.expect("add"));
    assert!(presence.add(&b, &user, &conn).await.expect("add"));
    assert!(presence.remove(&a, &user, &conn).await.expect("remove"));
    assert!(presence.users(&a).await.expect("users").is_empty());
    assert_eq!(presence.users(&b).await.expect("users"), vec![user]);
}

/// Runs the broker suite against the broker an async factory builds for a given local node.
/// The factory must keep [`HISTORY_SIZE`] messages per room.
#[macro_export]
macro_rules! broker_test_suite {
    ($make:expr) => {
        $crate::broker_test_suite!(@tests $make;
            offsets_start_at_one_and_have_no_gaps,
            concurrent_publishes_are_delivered_in_offset_order,
            history_pages_by_since_and_before,
            history_is_capped_and_says_when_a_gap_is_lost,
            events_and_presence_reach_the_room);
    };
    (@tests $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test]
            async fn $name() {
                let (node, rx) = $crate::testsuite::RecorderNode::node();
                let broker = ($make)(node).await;
                $crate::testsuite::$name(broker, rx).await;
            }
        )*
    };
}

/// Runs the presence suite against the engine an async factory builds.
#[macro_export]
macro_rules! presence_test_suite {
    ($make:expr) => {
        $crate::presence_test_suite!(@tests $make;
            presence_counts_users_not_connections,
            presence_rooms_are_independent);
    };
    (@tests $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test]
            async fn $name() {
                let presence = ($make)().await;
                $crate::testsuite::$name(presence).await;
            }
        )*
    };
}

/// The epoch the store suite writes in, unless a test says otherwise.
const EPOCH: &str = "e1";

fn message_at(key: &RoomKey, offset: u64) -> Arc<crate::Message> {
    message_in(key, EPOCH, offset)
}

fn message_in(key: &RoomKey, epoch: &str, offset: u64) -> Arc<crate::Message> {
    let mut publication = publication(
        key,
        &format!("{{\"n\":{offset},\"text\":\"hi, \\\"you\\\"\"}}"),
    );
    publication.id = format!("{}-{epoch}-{offset}", key.room);
    publication.ts = 1_700_000_000_000 + offset as i64;
    publication.instance = Some("node-a".into());
    Arc::new(publication.at(offset, epoch.into()))
}

pub async fn store_writes_are_idempotent(store: Arc<dyn crate::Store>) {
    let key = key("store-idem");
    let batch: Vec<_> = (1..=5).map(|o| message_at(&key, o)).collect();
    assert_eq!(store.write(&batch).await.expect("write"), 5);
    assert_eq!(
        store.write(&batch).await.expect("rewrite"),
        0,
        "a retried batch adds nothing"
    );
    let overlap: Vec<_> = (4..=7).map(|o| message_at(&key, o)).collect();
    assert_eq!(store.write(&overlap).await.expect("overlap"), 2);
    let all = store
        .history(&key, EPOCH, since(0, 100))
        .await
        .expect("history");
    assert_eq!(offsets(&all), (1..=7).collect::<Vec<_>>());
    let first = &all[0];
    assert_eq!(first.id, format!("{}-{EPOCH}-1", key.room));
    assert_eq!(&*first.epoch, EPOCH);
    assert_eq!(
        first.instance.as_deref(),
        Some("node-a"),
        "the publishing instance is kept"
    );
    assert_eq!(first.from.as_str(), "tester");
    assert_eq!(first.ts, 1_700_000_000_001);
    let data: serde_json::Value = serde_json::from_str(first.data.get()).expect("json");
    assert_eq!(data, serde_json::json!({"n": 1, "text": "hi, \"you\""}));
}

pub async fn store_history_pages_like_the_broker(store: Arc<dyn crate::Store>) {
    let key = key("store-pages");
    let other = self::key("store-other");
    let batch: Vec<_> = (1..=6)
        .map(|o| message_at(&key, o))
        .chain([message_at(&other, 1)])
        .collect();
    store.write(&batch).await.expect("write");
    let q = |since, before, limit| HistoryQuery {
        since,
        before,
        limit,
    };
    let page = store
        .history(&key, EPOCH, q(Some(2), None, 2))
        .await
        .expect("history");
    assert_eq!(offsets(&page), vec![3, 4]);
    let page = store
        .history(&key, EPOCH, q(None, None, 2))
        .await
        .expect("history");
    assert_eq!(offsets(&page), vec![5, 6]);
    let page = store
        .history(&key, EPOCH, q(None, Some(4), 10))
        .await
        .expect("history");
    assert_eq!(offsets(&page), vec![1, 2, 3]);
    let page = store
        .history(&key, EPOCH, q(Some(1), Some(4), 10))
        .await
        .expect("history");
    assert_eq!(offsets(&page), vec![2, 3]);
    let page = store
        .history(&other, EPOCH, q(Some(0), None, 10))
        .await
        .expect("history");
    assert_eq!(offsets(&page), vec![1], "rooms are separate");
}

pub async fn store_keeps_epochs_apart(store: Arc<dyn crate::Store>) {
    let key = key("store-epochs");
    let all = since(0, 100);
    let old: Vec<_> = (1..=3).map(|o| message_in(&key, "old", o)).collect();
    assert_eq!(store.write(&old).await.expect("write old"), 3);
    // The room's offsets start over under a new epoch (a restart, or serving alone while
    // Redis is away): the same offsets are new rows, not duplicates.
    let new: Vec<_> = (1..=2).map(|o| message_in(&key, "new", o)).collect();
    assert_eq!(store.write(&new).await.expect("write new"), 2);
    assert_eq!(store.write(&new).await.expect("rewrite new"), 0);
    let page = store.history(&key, "old", all).await.expect("old history");
    assert_eq!(offsets(&page), vec![1, 2, 3]);
    assert!(page.iter().all(|m| &*m.epoch == "old"));
    let page = store.history(&key, "new", all).await.expect("new history");
    assert_eq!(offsets(&page), vec![1, 2]);
    assert!(page.iter().all(|m| &*m.epoch == "new"));
    let page = store
        .history(&key, "never", all)
        .await
        .expect("unknown epoch");
    assert!(page.is_empty(), "an epoch with no rows has no history");
}

/// Runs the store suite against the store an async factory builds (each call a fresh store).
#[macro_export]
macro_rules! store_test_suite {
    ($make:expr) => {
        $crate::store_test_suite!(@tests $make;
            store_writes_are_idempotent,
            store_history_pages_like_the_broker,
            store_keeps_epochs_apart);
    };
    (@tests $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test]
            async fn $name() {
                let store = ($make)().await;
                $crate::testsuite::$name(store).await;
            }
        )*
    };
}

#[cfg(test)]
mod temp_tests {
    use std::time::{Duration, SystemTime};

    use super::remove_stale;

    #[test]
    fn only_old_directories_with_the_prefix_are_removed() {
        let root = std::env::temp_dir().join(format!("herald-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dirs = ["herald-x-old", "herald-x-new", "other-old"];
        for name in dirs {
            std::fs::create_dir_all(root.join(name)).expect("a directory");
        }
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        for name in ["herald-x-old", "other-old"] {
            let dir = std::fs::File::open(root.join(name)).expect("open the directory");
            dir.set_modified(two_hours_ago).expect("set its time");
        }
        remove_stale(&root, "herald-x-", Duration::from_secs(3600));
        let exists = |name: &str| root.join(name).exists();
        assert!(!exists("herald-x-old"), "stale, with the prefix: removed");
        assert!(exists("herald-x-new"), "recent: kept");
        assert!(exists("other-old"), "another prefix: kept");
        let _ = std::fs::remove_dir_all(&root);
    }
}
