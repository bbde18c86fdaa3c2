//! The shared Broker and Presence suites against a real Redis: `REDIS_URL` when given,
//! otherwise a private `redis-server` started for this test run. Each engine gets its own
//! key prefix.

use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use herald_core::{Broker, LocalNode, Namespace, Presence};
use herald_redis::{RedisBroker, RedisPresence, RedisSettings};

/// A Redis for this test binary. A private server is watched by a shell that stops it when
/// the test process exits.
fn redis_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("REDIS_URL") {
            return url;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let script = format!(
            "redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no >/dev/null & \
             pid=$!; while kill -0 {parent} 2>/dev/null; do sleep 1; done; kill $pid",
            parent = std::process::id()
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (or set REDIS_URL)");
        let url = format!("redis://127.0.0.1:{port}");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return url;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not start on port {port}");
    })
    .clone()
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
