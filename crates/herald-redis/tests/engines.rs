//! The shared Broker and Presence suites against a real Redis: `REDIS_URL` when given,
//! otherwise a private `redis-server` started for this test run. Each engine gets its own
//! key prefix.

use std::sync::Arc;
use std::time::Duration;

use herald_core::{Broker, LocalNode, Namespace, PersistQueue, Presence};
use herald_redis::{RedisBroker, RedisPresence, RedisSettings};

fn redis_url() -> String {
    herald_core::testsuite::redis_url()
}

fn settings() -> RedisSettings {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    RedisSettings {
        url: redis_url(),
        password: None,
        key: format!("test-{nanos:x}"),
        namespaces: vec![Namespace::root()],
        history_size: herald_core::testsuite::HISTORY_SIZE,
        history_ttl: Duration::from_secs(600),
        presence_ttl: Duration::from_secs(30),
        uid: format!("u{nanos:x}"),
        probe_interval: Duration::from_secs(1),
    }
}

async fn connected(broker: &RedisBroker) {
    let mut connected = broker.connected();
    tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|c| *c))
        .await
        .expect("redis connects within 10s")
        .expect("the broker is running");
}

async fn broker(node: Arc<dyn LocalNode>) -> Arc<dyn Broker> {
    let broker = RedisBroker::start(settings(), node).expect("valid settings");
    connected(&broker).await;
    Arc::new(broker)
}

mod broker_suite {
    use super::*;

    herald_core::broker_test_suite!(broker);
}

mod presence_suite {
    use super::*;

    async fn presence() -> Arc<dyn Presence> {
        let (node, _rx) = herald_core::testsuite::RecorderNode::node();
        let settings = settings();
        let broker = Arc::new(RedisBroker::start(settings.clone(), node).expect("valid settings"));
        connected(&broker).await;
        Arc::new(RedisPresence::start(settings, broker))
    }

    herald_core::presence_test_suite!(presence);
}

/// A plain connection for looking at the keys the broker wrote.
async fn inspect() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis connects")
}

/// The TTL in milliseconds of one of a room's keys (`offset`, `history`, `epoch`).
async fn pttl(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    room: &str,
    key: &str,
) -> i64 {
    redis::cmd("PTTL")
        .arg(format!("herald:{{{prefix}#/#{room}}}:{key}"))
        .query_async(conn)
        .await
        .expect("pttl")
}

#[tokio::test]
async fn a_room_keeps_its_keys_while_published_to_and_loses_them_a_ttl_after() {
    let mut settings = settings();
    settings.history_ttl = Duration::from_secs(2);
    let prefix = settings.key.clone();
    let (node, _rx) = herald_core::testsuite::RecorderNode::node();
    let broker = RedisBroker::start(settings, node).expect("valid settings");
    connected(&broker).await;
    let key = herald_core::testsuite::key("ttl");
    let room = key.room.as_str().to_owned();
    let mut conn = inspect().await;
    // Three TTLs of publishing, a message every 100 ms: the keys never expire, so the room's
    // offsets go on from one epoch.
    let mut epochs = std::collections::HashSet::new();
    for n in 1..=60u64 {
        let message = broker
            .publish(herald_core::testsuite::publication(&key, &n.to_string()))
            .await
            .expect("publish");
        assert_eq!(message.offset, n, "offsets go on while the room is busy");
        epochs.insert(message.epoch.to_string());
        for part in ["offset", "history", "epoch"] {
            let ttl = pttl(&mut conn, &prefix, &room, part).await;
            assert!(ttl > 0 && ttl <= 2000, "{part} has a TTL ({ttl} ms)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(epochs.len(), 1);
    // Idle for more than a TTL: the room starts over.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    for part in ["offset", "history", "epoch"] {
        assert_eq!(
            pttl(&mut conn, &prefix, &room, part).await,
            -2,
            "{part} expired"
        );
    }
    let again = broker
        .publish(herald_core::testsuite::publication(&key, "61"))
        .await
        .expect("publish");
    assert_eq!(again.offset, 1);
    assert!(!epochs.contains(&*again.epoch), "a new epoch");
}

#[tokio::test]
async fn a_batch_goes_to_the_persist_stream_in_few_entries_and_comes_out_as_its_messages() {
    let settings = settings();
    let (node, _rx) = herald_core::testsuite::RecorderNode::node();
    let broker = RedisBroker::start(settings.clone(), node).expect("valid settings");
    connected(&broker).await;
    let rooms = [
        herald_core::testsuite::key("packed-a"),
        herald_core::testsuite::key("packed-b"),
    ];
    let publications: Vec<_> = (0..300u64)
        .map(|n| {
            let mut p =
                herald_core::testsuite::publication(&rooms[(n % 2) as usize], &n.to_string());
            p.persist = true;
            p
        })
        .collect();
    let answers = broker.publish_batch(publications).await;
    let published: Vec<_> = answers
        .into_iter()
        .map(|a| a.expect("each message published"))
        .collect();
    for room in &rooms {
        let page = broker
            .history(
                room,
                herald_core::HistoryQuery {
                    since: None,
                    before: None,
                    limit: 1,
                },
            )
            .await
            .expect("history");
        assert_eq!(page.position.offset, 150, "150 messages in each room");
        for message in published.iter().filter(|m| m.room == room.room) {
            assert_eq!(message.epoch, page.position.epoch, "one epoch per room");
        }
    }
    let mut conn = inspect().await;
    let stream = herald_redis::persist::stream_key(&settings.key);
    let len: u64 = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .expect("xlen");
    assert_eq!(
        len, 3,
        "300 messages in script calls of 128: one entry per call"
    );

    let queue = herald_redis::RedisQueue::new(settings, "reader", Duration::from_secs(30));
    let mut read = Vec::new();
    while read.len() < 300 {
        let batch = queue
            .read(100, Duration::from_millis(200))
            .await
            .expect("read");
        assert!(!batch.is_empty(), "the stream holds every message");
        read.extend(batch);
    }
    let got: Vec<(String, u64, String)> = read
        .iter()
        .map(|e| {
            (
                e.message.room.as_str().to_owned(),
                e.message.offset,
                e.message.epoch.to_string(),
            )
        })
        .collect();
    let want: Vec<(String, u64, String)> = published
        .iter()
        .map(|m| (m.room.as_str().to_owned(), m.offset, m.epoch.to_string()))
        .collect();
    assert_eq!(got, want, "every message, in publish order, with its epoch");
    assert_eq!(queue.pending().await.expect("pending"), 3);
    let ids: Vec<String> = read.iter().map(|e| e.id.clone()).collect();
    queue.ack(&ids).await.expect("ack");
    assert_eq!(queue.pending().await.expect("pending"), 0);
    assert_eq!(queue.backlog().await.expect("backlog"), 0);
}
