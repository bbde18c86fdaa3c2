//! Several herald processes on one real Redis: ordering, exactly-once delivery, user-targeted
//! publishes, recovery on another instance, presence across instances and after `kill -9`,
//! per-room subscriptions, and a Redis restart.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{FLEET_API_KEY as API_KEY, Instance, fleet, prefix};
use herald_core::testsuite;
use serde_json::{Value, json};

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
    let fleet: Vec<Instance> = (0..2)
        .map(|i| Instance::start(&url, &key, &format!("r{i}"), &[]))
        .collect();
    for instance in &fleet {
        instance.wait_ready(true).await;
    }
    let mut a = fleet[0].client("a").await;
    let mut b = fleet[1].client("b").await;
    a.request(json!({"type": "join", "room": "restart"})).await;
    b.request(json!({"type": "join", "room": "restart"})).await;

    let stop = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "shutdown", "nosave"])
        .status();
    assert!(stop.is_ok(), "redis-cli must be on PATH");
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
