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
