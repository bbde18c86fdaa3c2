//! The plain WebSocket front door at `/ws`, driven by a Rust WebSocket client against a real
//! server on 127.0.0.1:0.

mod common;

use common::{TestServer, WsClient, token};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_join_message_and_delivery_have_the_documented_shapes() {
    let server = TestServer::start().await;
    let (mut alice, session) = WsClient::connect(&server, "alice").await;
    assert_eq!(session["user"], "alice");
    assert_eq!(session["instance"], "rust-test");
    assert!(session["sid"].as_str().is_some_and(|s| !s.is_empty()));

    let ack = alice
        .request(json!({"type": "join", "room": "lobby"}))
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(ack["room"], "lobby");
    assert_eq!(ack["offset"], 0);
    assert_eq!(ack["recovered"], false);

    let (mut bob, _) = WsClient::connect(&server, "bob").await;
    bob.request(json!({"type": "join", "room": "lobby"})).await;
    let joined = alice.next_pushed("presence").await;
    assert_eq!(
        joined,
        json!({"type": "presence", "room": "lobby", "user": "alice", "status": "join"})
    );
    let joined = alice.next_pushed("presence").await;
    assert_eq!(joined["user"], "bob");

    let ack = alice
        .request(json!({"type": "message", "room": "lobby", "data": {"text": "hi"}}))
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(ack["offset"], 1);
    let id = ack["message_id"].clone();
    assert!(id.as_str().is_some_and(|id| !id.is_empty()));
    for client in [&mut alice, &mut bob] {
        let message = client.next_pushed("message").await;
        let mut keys: Vec<_> = message
            .as_object()
            .expect("object")
            .keys()
            .cloned()
            .collect();
        keys.sort();
        assert_eq!(keys, ["data", "from", "id", "offset", "room", "ts", "type"]);
        assert_eq!(message["id"], id);
        assert_eq!(message["from"], "alice");
        assert_eq!(message["data"], json!({"text": "hi"}));
        assert!(
            message["ts"]
                .as_i64()
                .is_some_and(|ts| ts > 1_700_000_000_000)
        );
    }

    let ack = bob
        .request(json!({"type": "presence", "room": "lobby"}))
        .await;
    assert_eq!(ack["users"], json!(["alice", "bob"]));
    let ack = bob
        .request(json!({"type": "history", "room": "lobby"}))
        .await;
    assert_eq!(ack["messages"][0]["id"], id);

    let ack = bob.request(json!({"type": "leave", "room": "lobby"})).await;
    assert_eq!(ack["ok"], true);
    let left = alice.next_pushed("presence").await;
    assert_eq!(
        left,
        json!({"type": "presence", "room": "lobby", "user": "bob", "status": "leave"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_refused_at_the_upgrade() {
    let server = TestServer::start().await;
    for url in [
        format!("ws://{}/ws", server.addr),
        format!("ws://{}/ws?token=garbage", server.addr),
        format!(
            "ws://{}/ws?token={}",
            server.addr,
            common::token("x").replace('.', ".x")
        ),
    ] {
        let err = tokio_tungstenite::connect_async(&url)
            .await
            .expect_err("refused");
        match err {
            tokio_tungstenite::tungstenite::Error::Http(response) => {
                assert_eq!(response.status(), 401)
            }
            other => panic!("expected an HTTP 401, got {other}"),
        }
    }
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/ws",
            server.addr
        ))
        .expect("request");
    let bearer = format!("Bearer {}", token("carol"))
        .parse()
        .expect("header");
    request.headers_mut().insert("authorization", bearer);
    let (mut stream, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("bearer header accepted");
    let first = futures::StreamExt::next(&mut stream)
        .await
        .expect("frame")
        .expect("ok");
    assert!(
        first
            .to_text()
            .expect("text")
            .contains("\"user\":\"carol\"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_with_since_replays_the_gap_before_the_ack() {
    let server = TestServer::start_with(|c| c.history_size = 4).await;
    let (mut writer, _) = WsClient::connect(&server, "writer").await;
    writer
        .request(json!({"type": "join", "room": "news"}))
        .await;
    for i in 1..=6 {
        let ack = writer
            .request(json!({"type": "message", "room": "news", "data": i}))
            .await;
        assert_eq!(ack["offset"], i);
    }

    let (mut reader, _) = WsClient::connect(&server, "reader").await;
    let ack = reader
        .request(json!({"type": "join", "room": "news", "since": 3}))
        .await;
    let replayed: Vec<Value> = reader
        .pushed
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| f["offset"].clone())
        .collect();
    assert_eq!(
        replayed,
        vec![json!(4), json!(5), json!(6)],
        "replayed before the ack"
    );
    assert_eq!(ack["recovered"], true);
    assert_eq!(ack["offset"], 6);

    let (mut late, _) = WsClient::connect(&server, "late").await;
    let ack = late
        .request(json!({"type": "join", "room": "news", "since": 1}))
        .await;
    assert_eq!(ack["recovered"], false, "offset 2 is no longer kept");
    let (mut ahead, _) = WsClient::connect(&server, "ahead").await;
    let ack = ahead
        .request(json!({"type": "join", "room": "news", "since": 60}))
        .await;
    assert_eq!(ack["recovered"], false, "a since beyond the latest offset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_during_live_traffic_misses_and_repeats_nothing() {
    let server = TestServer::start().await;
    let (mut writer, _) = WsClient::connect(&server, "writer").await;
    writer
        .request(json!({"type": "join", "room": "busy"}))
        .await;
    for i in 1..=50 {
        writer
            .request(json!({"type": "message", "room": "busy", "data": i}))
            .await;
    }
    let publisher = tokio::spawn(async move {
        for i in 51..=300 {
            writer
                .request(json!({"type": "message", "room": "busy", "data": i}))
                .await;
        }
        writer
    });
    let (mut reader, _) = WsClient::connect(&server, "reader").await;
    let ack = reader
        .request(json!({"type": "join", "room": "busy", "since": 10}))
        .await;
    assert_eq!(ack["recovered"], true, "{ack}");
    let _writer = publisher.await.expect("publisher");
    let mut offsets = Vec::new();
    while offsets.last() != Some(&300) {
        let frame = reader.next_pushed("message").await;
        offsets.push(frame["offset"].as_u64().expect("offset"));
    }
    assert_eq!(offsets, (11..=300).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tabs_of_one_user_arrive_and_leave_once() {
    let server = TestServer::start().await;
    let (mut watcher, _) = WsClient::connect(&server, "watcher").await;
    watcher
        .request(json!({"type": "join", "room": "tabs"}))
        .await;
    let _ = watcher.next_pushed("presence").await;
    let (mut tab1, _) = WsClient::connect(&server, "dana").await;
    let (mut tab2, _) = WsClient::connect(&server, "dana").await;
    tab1.request(json!({"type": "join", "room": "tabs"})).await;
    tab2.request(json!({"type": "join", "room": "tabs"})).await;
    let ack = tab1.request(json!({"type": "leave", "room": "tabs"})).await;
    assert_eq!(ack["ok"], true);
    drop(tab2);
    let mut events = Vec::new();
    while events.last() != Some(&(json!("dana"), json!("leave"))) {
        let frame = watcher.next_pushed("presence").await;
        events.push((frame["user"].clone(), frame["status"].clone()));
    }
    // A marker message orders the check: any further presence event would arrive before it.
    watcher
        .request(json!({"type": "message", "room": "tabs", "data": "marker"}))
        .await;
    // The echo may come before the ack, in which case `request` kept it (and anything
    // before it) in `pushed`.
    let mut kept = std::mem::take(&mut watcher.pushed).into_iter();
    loop {
        let frame = match kept.next() {
            Some(frame) => frame,
            None => watcher.recv().await,
        };
        match frame["type"].as_str() {
            Some("presence") => events.push((frame["user"].clone(), frame["status"].clone())),
            Some("message") => break,
            _ => {}
        }
    }
    assert_eq!(
        events,
        vec![
            (json!("dana"), json!("join")),
            (json!("dana"), json!("leave"))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_the_connection_carries_on() {
    let server = TestServer::start_with(|c| c.max_payload = 256).await;
    let (mut client, _) = WsClient::connect(&server, "mallory").await;
    client.send_raw("{not json").await;
    let ack = client.recv().await;
    assert_eq!(
        (ack["type"].clone(), ack["id"].clone(), ack["ok"].clone()),
        (json!("ack"), Value::Null, json!(false))
    );
    assert_eq!(ack["error"], "bad_request");
    client.send_raw("[1,2]").await;
    assert_eq!(client.recv().await["error"], "bad_request");

    let cases = [
        (json!({"type": "explode"}), "unknown_event"),
        (json!({"type": "join", "room": "bad room!"}), "invalid_room"),
        (
            json!({"type": "join", "room": "r".repeat(129)}),
            "invalid_room",
        ),
        (json!({"type": "join"}), "bad_request"),
        (
            json!({"type": "join", "room": "user:someone-else"}),
            "forbidden",
        ),
        (
            json!({"type": "message", "room": "nojoin", "data": 1}),
            "not_member",
        ),
        (
            json!({"type": "message", "room": "user:mallory", "data": "x".repeat(300)}),
            "payload_too_large",
        ),
    ];
    for (frame, code) in cases {
        let ack = client.request(frame.clone()).await;
        assert_eq!(ack["ok"], false, "{frame}");
        assert_eq!(ack["error"], code, "{frame} -> {ack}");
        assert!(ack["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let ack = client
        .request(json!({"type": "join", "room": "fine"}))
        .await;
    assert_eq!(ack["ok"], true, "the connection still works");

    client
        .send_raw(&format!(
            "{{\"type\":\"message\",\"room\":\"fine\",\"data\":\"{}\"}}",
            "x".repeat(32 * 1024)
        ))
        .await;
    let (code, reason) = client.closed().await;
    assert_eq!(code, 1009, "{reason}");

    let (mut other, _) = WsClient::connect(&server, "other").await;
    assert_eq!(
        other.request(json!({"type": "join", "room": "fine"})).await["ok"],
        true,
        "others are unaffected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_claims_limit_joins() {
    let server = TestServer::start().await;
    let url = format!(
        "ws://{}/ws?token={}",
        server.addr,
        common::token_with("erin", Some(vec!["chat:*".into()]))
    );
    let (mut client, _) = WsClient::connect_url(&url).await;
    assert_eq!(
        client
            .request(json!({"type": "join", "room": "chat:1"}))
            .await["ok"],
        true
    );
    assert_eq!(
        client
            .request(json!({"type": "join", "room": "admin"}))
            .await["error"],
        "forbidden"
    );
    assert_eq!(
        client
            .request(json!({"type": "history", "room": "admin"}))
            .await["error"],
        "forbidden"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reports_not_ready_and_closes_clients_with_going_away() {
    let server = TestServer::start().await;
    let ready = reqwest::get(server.url("/ready")).await.expect("ready");
    assert_eq!(ready.status(), 200);
    let (mut client, _) = WsClient::connect(&server, "frank").await;
    client.request(json!({"type": "join", "room": "bye"})).await;
    let task = server.shutdown();
    let (code, reason) = client.closed().await;
    assert_eq!(code, 1001, "{reason}");
    let result = tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
    assert!(
        matches!(result, Ok(Ok(Ok(())))),
        "the server exits cleanly within its timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_are_refused_per_connection_and_per_user_and_others_carry_on() {
    let server = TestServer::start_with(|c| {
        c.event_rate = 5;
        c.user_event_rate = 6;
    })
    .await;
    let (mut flood, _) = WsClient::connect(&server, "flooder").await;
    let mut codes = Vec::new();
    for _ in 0..30 {
        let ack = flood
            .request(json!({"type": "presence", "room": "r"}))
            .await;
        codes.push(ack["error"].as_str().unwrap_or("ok").to_owned());
    }
    let allowed = codes.iter().filter(|c| *c == "ok").count();
    assert!(
        (10..30).contains(&allowed),
        "a burst passes, the rest of the flood does not: {codes:?}"
    );
    assert!(
        codes.iter().all(|c| c == "ok" || c == "rate_limited"),
        "{codes:?}"
    );

    // The same user on another connection shares the user's budget, which is now spent.
    let (mut second, _) = WsClient::connect(&server, "flooder").await;
    let mut user_limited = false;
    for _ in 0..5 {
        let ack = second
            .request(json!({"type": "presence", "room": "r"}))
            .await;
        if ack["error"] == "rate_limited" {
            assert!(
                ack["message"].as_str().is_some_and(|m| m.contains("user")),
                "{ack}"
            );
            user_limited = true;
            break;
        }
    }
    assert!(user_limited, "the user's limit spans connections");

    let (mut calm, _) = WsClient::connect(&server, "calm").await;
    let ack = calm.request(json!({"type": "join", "room": "r"})).await;
    assert_eq!(ack["ok"], true, "other users are unaffected: {ack}");
}

/// Signs `claims` with the test secret, however odd they are.
fn sign(claims: Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(common::SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("sign")
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

async fn upgrade_status(server: &TestServer, token: &str) -> u16 {
    let url = format!("ws://{}/ws?token={token}", server.addr);
    match tokio_tungstenite::connect_async(&url).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_try_to_get_around_auth_are_refused_at_the_upgrade() {
    let server = TestServer::start().await;
    let now = now_secs();
    let ok = sign(json!({"sub": "dave", "exp": now + 600}));
    assert_eq!(upgrade_status(&server, &ok).await, 101, "the control case");
    let provider = sign(json!({"sub": "auth0|5f7c8ec7c33c6c004bbafe82", "exp": now + 600}));
    assert_eq!(
        upgrade_status(&server, &provider).await,
        101,
        "an identity provider's user id"
    );
    let [header, payload, _] =
        <[&str; 3]>::try_from(ok.split('.').collect::<Vec<_>>()).expect("three parts");
    let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"; // {"alg":"none","typ":"JWT"}
    let refused = [
        (
            "alg none, no signature",
            format!("{none_header}.{payload}."),
        ),
        ("signature stripped", format!("{header}.{payload}.")),
        (
            "not valid yet (nbf)",
            sign(json!({"sub": "dave", "exp": now + 600, "nbf": now + 300})),
        ),
        ("no exp: would never expire", sign(json!({"sub": "dave"}))),
        ("expired", sign(json!({"sub": "dave", "exp": now - 1}))),
        (
            "a subject that is no valid user id",
            sign(json!({"sub": "dave#admin", "exp": now + 600})),
        ),
    ];
    for (what, token) in refused {
        assert_eq!(upgrade_status(&server, &token).await, 401, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_rules_hold_for_every_command_that_names_a_room() {
    let server = TestServer::start().await;
    let (mut alice, _) = WsClient::connect(&server, "alice").await;
    let ack = alice
        .request(json!({"type": "join", "room": "user:alice"}))
        .await;
    assert_eq!(ack["ok"], true, "one's own room: {ack}");

    let (mut eve, _) = WsClient::connect(&server, "eve").await;
    for frame in [
        json!({"type": "join", "room": "user:alice"}),
        json!({"type": "join", "room": "user:alice", "since": 0}),
        json!({"type": "presence", "room": "user:alice"}),
        json!({"type": "history", "room": "user:alice"}),
    ] {
        let ack = eve.request(frame.clone()).await;
        assert_eq!(ack["error"], "forbidden", "{frame}: {ack}");
    }
    let ack = eve
        .request(json!({"type": "message", "room": "user:alice", "data": "boo"}))
        .await;
    assert_eq!(ack["error"], "not_member", "{ack}");

    // Publishing needs membership now, not once.
    let ack = eve.request(json!({"type": "join", "room": "hall"})).await;
    assert_eq!(ack["ok"], true);
    eve.request(json!({"type": "leave", "room": "hall"})).await;
    let ack = eve
        .request(json!({"type": "message", "room": "hall", "data": "after leaving"}))
        .await;
    assert_eq!(ack["error"], "not_member", "{ack}");

    // A rooms claim bounds presence and history too, and globs match whole names only.
    let url = format!(
        "ws://{}/ws?token={}",
        server.addr,
        common::token_with("scoped", Some(vec!["chat:*".into()]))
    );
    let (mut scoped, _) = WsClient::connect_url(&url).await;
    for frame in [
        json!({"type": "join", "room": "chat"}),
        json!({"type": "join", "room": "xchat:1"}),
        json!({"type": "presence", "room": "hall"}),
        json!({"type": "history", "room": "hall"}),
    ] {
        let ack = scoped.request(frame.clone()).await;
        assert_eq!(ack["error"], "forbidden", "{frame}: {ack}");
    }
    let ack = scoped
        .request(json!({"type": "join", "room": "user:scoped"}))
        .await;
    assert_eq!(
        ack["ok"], true,
        "one's own room is outside any claim: {ack}"
    );
    assert!(
        alice.pushed.is_empty(),
        "nothing reached alice: {:?}",
        alice.pushed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_within_its_timeout_even_with_peers_that_hang() {
    use tokio::io::AsyncWriteExt;
    let timeout = std::time::Duration::from_secs(2);
    let server = TestServer::start_with(|c| {
        c.shutdown_timeout = timeout;
        // Never a slow consumer here: the client below stays connected, stuck.
        c.outbound_queue = 100_000;
    })
    .await;
    // A websocket client in a busy room that stops reading: once the kernel's buffers are
    // full, nothing more (not even the close frame) reaches it.
    let (mut mute, _) = WsClient::connect(&server, "mute").await;
    mute.request(json!({"type": "join", "room": "busy"})).await;
    let http = reqwest::Client::new();
    let data = "x".repeat(60_000);
    for _ in 0..20 {
        let messages: Vec<_> = (0..10)
            .map(|_| json!({"room": "busy", "data": data}))
            .collect();
        let answer = http
            .post(server.url("/api/publish"))
            .bearer_auth(common::API_KEY)
            .json(&json!({"messages": messages}))
            .send()
            .await
            .expect("publish");
        assert_eq!(answer.status(), 200);
    }
    // An HTTP request whose headers never finish.
    let mut half = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("tcp");
    half.write_all(b"GET /health HTTP/1.1\r\nHost: herald\r\n")
        .await
        .expect("partial request");
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(timeout * 5, server.shutdown()).await;
    let took = started.elapsed();
    assert!(
        matches!(result, Ok(Ok(Ok(())))),
        "the server exits cleanly: {result:?}"
    );
    assert!(
        took < timeout + std::time::Duration::from_millis(700),
        "the whole shutdown fits in HERALD_SHUTDOWN_TIMEOUT ({timeout:?}), took {took:?}"
    );
    drop((mute, half));
}
