//! The shared Broker and Presence suites against a real Redis: `REDIS_URL` when given,
//! otherwise a private `redis-server` started for this test run. Each engine gets its own
//! key prefix.

use std::sync::Arc;
use std::time::Duration;

use herald_core::{Broker, LocalNode, Namespace, Presence};
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

/// Concurrent publishes share script calls; a message the script refuses (here its room's
/// offset key holds something that is not a number) fails alone, and the others in flight with
/// it get their offsets.
#[tokio::test]
async fn a_message_the_publish_script_refuses_fails_alone() {
    let (node, _rx) = herald_core::testsuite::RecorderNode::node();
    let settings = settings();
    let broker = Arc::new(RedisBroker::start(settings.clone(), node).expect("valid settings"));
    connected(&broker).await;
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let good = herald_core::testsuite::key("fine");
    let bad = herald_core::testsuite::key("broken");
    let _: () = redis::cmd("SET")
        .arg(format!("herald:{{{}#/#{}}}:offset", settings.key, bad.room))
        .arg("not a number")
        .query_async(&mut conn)
        .await
        .expect("SET");

    let mut tasks = Vec::new();
    for i in 0..60 {
        let broker = broker.clone();
        let key = if i == 30 { bad.clone() } else { good.clone() };
        let p = herald_core::testsuite::publication(&key, &i.to_string());
        tasks.push(tokio::spawn(async move { (i, broker.publish(p).await) }));
    }
    let mut offsets = Vec::new();
    for t in tasks {
        let (i, result) = t.await.expect("publisher task");
        if i == 30 {
            let error = result.expect_err("the broken room refuses").to_string();
            assert!(error.contains("refused the message"), "{error}");
        } else {
            offsets.push(result.expect("the others are published").offset);
        }
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=59).collect::<Vec<_>>());
}
