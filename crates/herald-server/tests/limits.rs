//! Limits at the door and on the way out: per-IP connection rate, connection caps, rooms per
//! connection, the HTTP API body limit, and slow consumers.

mod common;

use std::time::{Duration, Instant};

use common::{Instance, TestServer, WsClient, assert_refused, token};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Opens `/ws` as `sub`, sending `headers`; returns the refusal's status and JSON body, or
/// the open client.
async fn open(
    addr: std::net::SocketAddr,
    sub: &str,
    headers: &[(&'static str, &str)],
) -> Result<WsClient, (u16, Value)> {
    let url = format!("ws://{addr}/ws?token={}", token(sub));
    let mut request = url.into_client_request().expect("request");
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, value.parse().expect("header value"));
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((stream, _)) => Ok(WsClient::from_stream(stream).await),
        Err(WsError::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Err((status, body))
        }
        Err(other) => panic!("expected an open socket or an HTTP refusal, got {other}"),
    }
}

async fn metric(server: &TestServer, name: &str) -> f64 {
    common::metric_at(&server.url("/metrics"), name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_beyond_the_ip_rate_get_429_rate_limited() {
    // 1/s allows a burst of 2.
    let server = TestServer::start_with(|c| c.ip_connect_rate = 1).await;
    let _a = open(server.addr, "ip-a", &[]).await.expect("first");
    let _b = open(server.addr, "ip-b", &[]).await.expect("second");
    let (status, body) = open(server.addr, "ip-c", &[])
        .await
        .err()
        .expect("third is refused");
    assert_eq!(status, 429);
    assert_refused(&body, "rate_limited", "1 new");
    // Without a trusted proxy, a forwarded address is the client's own claim: ignored.
    let (status, _) = open(server.addr, "ip-d", &[("x-forwarded-for", "198.51.100.1")])
        .await
        .err()
        .expect("a spoofed header does not buy a new budget");
    assert_eq!(status, 429);
    assert!(metric(&server, "herald_rate_limited_total{scope=\"ip\"}").await >= 2.0);
    assert!(
        metric(
            &server,
            "herald_connections_refused_total{reason=\"rate_limited\",transport=\"ws\"}"
        )
        .await
            >= 2.0
    );
    // After a second the budget is back.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    open(server.addr, "ip-e", &[])
        .await
        .expect("a second later");
}

/// A flood of bare Engine.IO handshakes, which never connect a Socket.IO namespace (where
/// the connection rate is counted), is held to twice the connection rate per address: the
/// rest get 429 `rate_limited` before a session is opened, and requests of open sessions
/// (with a `sid`) are not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_engine_io_handshakes_beyond_twice_the_ip_rate_get_429() {
    // 2/s for handshakes, with a burst of 4.
    let server = TestServer::start_with(|c| c.ip_connect_rate = 1).await;
    let http = reqwest::Client::new();
    let handshake = || async {
        let response = http
            .get(server.url("/socket.io/?EIO=4&transport=polling"))
            .send()
            .await
            .expect("get");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    };
    let mut opened = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..10 {
        let (status, body) = handshake().await;
        match status {
            200 => opened.push(body),
            _ => refused.push((status, body)),
        }
    }
    assert_eq!(opened.len(), 4, "the burst: {refused:?}");
    assert!(
        refused
            .iter()
            .all(|(status, body)| *status == 429 && body.contains("rate_limited")),
        "{refused:?}"
    );
    // An open session's own requests are not handshakes.
    let open: Value =
        serde_json::from_str(opened[0].trim_start_matches('0')).expect("an open packet");
    let sid = open["sid"].as_str().expect("sid");
    for _ in 0..3 {
        let response = http
            .post(server.url(&format!("/socket.io/?EIO=4&transport=polling&sid={sid}")))
            .body("3")
            .send()
            .await
            .expect("post");
        assert_eq!(response.status(), 200, "a ping on the open session");
    }
    assert!(
        metric(
            &server,
            "herald_connections_refused_total{reason=\"rate_limited\",transport=\"engineio\"}"
        )
        .await
            >= 6.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_rate() {
    let server = TestServer::start_with(|c| {
        c.ip_connect_rate = 1;
        c.trusted_proxies = vec!["127.0.0.0/8".parse().expect("range")];
    })
    .await;
    let first = [("x-forwarded-for", "203.0.113.1")];
    let _a = open(server.addr, "px-a", &first).await.expect("1st");
    let _b = open(server.addr, "px-b", &first).await.expect("2nd");
    let (status, body) = open(server.addr, "px-c", &first)
        .await
        .err()
        .expect("3rd from the same client");
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited"))
    );
    let other = [("x-forwarded-for", "203.0.113.2")];
    let _d = open(server.addr, "px-d", &other)
        .await
        .expect("another client behind the same proxy");
    // A client cannot pose as someone else by writing the header itself: the proxy appends
    // the real address, and that is the one counted.
    let spoofed = [("x-forwarded-for", "198.51.100.9, 203.0.113.1")];
    let (status, _) = open(server.addr, "px-e", &spoofed)
        .await
        .err()
        .expect("still 203.0.113.1");
    assert_eq!(status, 429);
    let real_ip = [("x-real-ip", "203.0.113.3")];
    let _f = open(server.addr, "px-f", &real_ip)
        .await
        .expect("X-Real-IP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_per_user_and_per_instance_refuse_and_free_their_places() {
    let server = TestServer::start_with(|c| {
        c.max_connections = 3;
        c.max_user_connections = 2;
    })
    .await;
    let alice1 = open(server.addr, "alice", &[]).await.expect("alice 1");
    let _alice2 = open(server.addr, "alice", &[]).await.expect("alice 2");
    let (status, body) = open(server.addr, "alice", &[])
        .await
        .err()
        .expect("alice 3");
    assert_eq!(status, 429);
    assert_eq!(body["error"], "too_many_connections", "{body}");
    let _bob = open(server.addr, "bob", &[]).await.expect("bob");
    let (status, body) = open(server.addr, "carol", &[])
        .await
        .err()
        .expect("the instance is full");
    assert_eq!(status, 503);
    assert_eq!(body["error"], "server_full", "{body}");
    assert!(
        metric(
            &server,
            "herald_connections_refused_total{reason=\"server_full\",transport=\"ws\"}"
        )
        .await
            >= 1.0
    );

    // A closed connection gives its places back.
    drop(alice1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match open(server.addr, "alice", &[]).await {
            Ok(_) => break,
            Err(refusal) if Instant::now() < deadline => {
                let _ = refusal;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(refusal) => panic!("alice's place was never freed: {refusal:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_beyond_max_rooms_get_too_many_rooms() {
    let server = TestServer::start_with(|c| c.max_rooms = 2).await;
    let (mut client, _) = WsClient::connect(&server, "roomy").await;
    for room in ["a", "b"] {
        let ack = client.request(json!({"type": "join", "room": room})).await;
        assert_eq!(ack["ok"], true, "{ack}");
    }
    let ack = client.request(json!({"type": "join", "room": "c"})).await;
    assert_eq!(ack["ok"], false);
    assert_eq!(ack["error"], "too_many_rooms", "{ack}");
    // Joining a room again, or the connection's own room, takes no new place.
    for room in ["a", "user:roomy"] {
        let ack = client.request(json!({"type": "join", "room": room})).await;
        assert_eq!(ack["ok"], true, "{room}: {ack}");
    }
    client.request(json!({"type": "leave", "room": "a"})).await;
    let ack = client.request(json!({"type": "join", "room": "c"})).await;
    assert_eq!(ack["ok"], true, "a left room frees its place: {ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_takes_bodies_up_to_the_payload_limit_and_refuses_larger_ones_clearly() {
    let server = TestServer::start_with(|c| c.max_payload = 3 * 1024 * 1024).await;
    let http = reqwest::Client::new();
    let publish = |data: String| {
        http.post(server.url("/api/publish"))
            .bearer_auth(common::API_KEY)
            .json(&json!({"room": "big", "data": data}))
            .send()
    };
    // Larger than a web framework's usual 2 MB default, within HERALD_MAX_PAYLOAD.
    let response = publish("x".repeat(2_500_000)).await.expect("send");
    assert_eq!(response.status(), 200);
    let response = publish("x".repeat(4_000_000)).await.expect("send");
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.expect("a JSON error body");
    assert_refused(&body, "payload_too_large", "limit");
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads every frame of a healthy member until it has seen `count` messages, recording the
/// publish-to-receive latency of each (from the message's own `ts`). The stream comes back,
/// so that the member stays connected.
async fn read_messages(
    mut stream: futures::stream::SplitStream<Socket>,
    count: u64,
) -> (Vec<u64>, Vec<u64>, futures::stream::SplitStream<Socket>) {
    let (mut offsets, mut latencies) = (Vec::new(), Vec::new());
    while (offsets.len() as u64) < count {
        let frame = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("a frame within 30s")
            .expect("open")
            .expect("readable");
        let Message::Text(text) = frame else {
            continue;
        };
        let frame: Value = serde_json::from_str(text.as_str()).expect("json");
        if frame["type"] == "message" {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_millis() as u64;
            offsets.push(frame["offset"].as_u64().expect("offset"));
            latencies.push(now.saturating_sub(frame["ts"].as_u64().expect("ts")));
        }
    }
    (offsets, latencies, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_while_memory_stays_flat_and_others_get_everything() {
    const MESSAGES: u64 = 3000;
    const SIZE: usize = 16 * 1024;
    let instance = Instance::alone(
        "slow",
        &[
            ("HERALD_OUTBOUND_QUEUE", "256"),
            ("HERALD_HISTORY_SIZE", "50"),
            ("HERALD_PERSIST", "off"),
            ("HERALD_EVENT_RATE", "0"),
            ("HERALD_USER_EVENT_RATE", "0"),
            ("HERALD_SEND_TIMEOUT", "2s"),
        ],
    );
    instance.wait_ready(true).await;
    let room = "firehose";
    let ws_url = |sub: &str| format!("ws://{}/ws?token={}", instance.addr, token(sub));

    // The stalled clients: a /ws one and a Socket.IO (websocket transport) one. Each joins,
    // reads its ack, and never reads again.
    let (mut stalled_ws, _) = tokio_tungstenite::connect_async(ws_url("stalled-ws"))
        .await
        .expect("connect");
    stalled_ws
        .send(Message::text(
            json!({"type": "join", "room": room, "id": 1}).to_string(),
        ))
        .await
        .expect("send join");
    read_until(&mut stalled_ws, |f| f.contains("\"type\":\"ack\"")).await;
    let sio_url = format!(
        "ws://{}/socket.io/?EIO=4&transport=websocket",
        instance.addr
    );
    let (mut stalled_sio, _) = tokio_tungstenite::connect_async(sio_url)
        .await
        .expect("connect socket.io");
    read_until(&mut stalled_sio, |f| f.starts_with('0')).await;
    stalled_sio
        .send(Message::text(format!(
            "40{}",
            json!({"token": token("stalled-sio")})
        )))
        .await
        .expect("send CONNECT");
    read_until(&mut stalled_sio, |f| f.starts_with("40")).await;
    stalled_sio
        .send(Message::text(format!("421{}", json!(["join", room]))))
        .await
        .expect("send join");
    read_until(&mut stalled_sio, |f| f.starts_with("431")).await;

    // Two healthy members, one of which publishes.
    let mut healthy = Vec::new();
    for sub in ["reader", "publisher"] {
        let mut client = instance.client(sub).await;
        let ack = client.request(json!({"type": "join", "room": room})).await;
        assert_eq!(ack["ok"], true, "{ack}");
        healthy.push(client);
    }
    let publisher = healthy.pop().expect("publisher");
    let reader = healthy.pop().expect("reader");
    let (_reader_tx, reader_rx) = reader.into_stream().split();
    let reader = tokio::spawn(read_messages(reader_rx, MESSAGES));
    let (mut publish_tx, publish_rx) = publisher.into_stream().split();
    let publisher_reads = tokio::spawn(read_messages(publish_rx, MESSAGES));

    let rss_before = instance.rss_kib();
    let padding = "x".repeat(SIZE);
    let started = Instant::now();
    for i in 0..MESSAGES {
        let frame = json!({"type": "message", "room": room, "data": {"i": i, "pad": padding}});
        publish_tx
            .send(Message::text(frame.to_string()))
            .await
            .expect("publish");
        // Keep the healthy readers' queues short: they read as fast as herald sends.
        if i % 64 == 63 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let (offsets, latencies, _reader_rx) = reader.await.expect("reader");
    let (publisher_offsets, _, _publisher_rx) = publisher_reads.await.expect("publisher reads");
    let took = started.elapsed();
    let rss_after = instance.rss_kib();

    let expected: Vec<u64> = (1..=MESSAGES).collect();
    assert_eq!(offsets, expected, "the reader got every message, in order");
    assert_eq!(publisher_offsets, expected, "so did the publisher");
    let mut sorted = latencies.clone();
    sorted.sort_unstable();
    let p50 = sorted[sorted.len() / 2];
    let p99 = sorted[sorted.len() * 99 / 100];
    let max = *sorted.last().expect("latencies");
    let published_mib = MESSAGES as usize * SIZE / (1024 * 1024);
    let growth_mib = rss_after.saturating_sub(rss_before) / 1024;
    eprintln!(
        "published {published_mib} MiB in {took:?}; reader latency p50 {p50} ms, p99 {p99} ms, \
         max {max} ms; RSS {rss_before} KiB -> {rss_after} KiB"
    );
    assert!(
        growth_mib < 24,
        "RSS grew by {growth_mib} MiB while {published_mib} MiB went to a client that never reads"
    );
    assert!(
        max < 2000,
        "healthy members kept their latency: max {max} ms"
    );

    // Both stalled clients were cut off and counted (by their session tasks, which may still
    // be finishing).
    for transport in ["ws", "socketio"] {
        let name = format!("herald_slow_consumer_disconnects_total{{transport=\"{transport}\"}}");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut counted = instance.metric(&name).await;
        while counted < 1.0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            counted = instance.metric(&name).await;
        }
        assert_eq!(counted, 1.0, "{transport}");
    }
    // The Socket.IO one cannot even take its notice; once its window has stayed shut for
    // HERALD_SEND_TIMEOUT, the kernel aborts the connection, which it finds when it reads
    // again: a reset after what was already in its buffers, not a close.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline.into(), stalled_sio.next()).await {
            Ok(Some(Err(_)) | None) => break,
            Ok(Some(Ok(Message::Close(_)))) => {
                panic!("the stalled Socket.IO connection stayed open until it read again")
            }
            Ok(Some(Ok(_))) => continue,
            Err(_) => panic!("the stalled Socket.IO connection was never closed"),
        }
    }
    // The /ws one finds its connection closed once it reads again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline.into(), stalled_ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                let frame = frame.expect("a close frame");
                assert_eq!(u16::from(frame.code), 1008);
                assert!(frame.reason.contains("slow consumer"), "{}", frame.reason);
                break;
            }
            Ok(Some(Ok(_))) => continue,
            Ok(None | Some(Err(_))) => break,
            Err(_) => panic!("the stalled /ws client was never disconnected"),
        }
    }
    // The connections gauge comes back to the healthy pair: the Socket.IO session ends once
    // its notice could not be delivered.
    let deadline = Instant::now() + Duration::from_secs(15);
    while instance.metric("herald_connections{").await != 2.0 {
        if Instant::now() > deadline {
            let text = reqwest::get(instance.url("/metrics"))
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text");
            let open: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("herald_connections{"))
                .collect();
            panic!("the stalled connections still count as open: {open:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = instance.metric("herald_messages_published_total").await;
    assert!(sent >= MESSAGES as f64, "{sent}");
}

/// Reads text frames until one matches.
async fn read_until(stream: &mut Socket, done: impl Fn(&str) -> bool) {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a frame within 5s")
            .expect("open")
            .expect("readable");
        if let Message::Text(text) = frame
            && done(text.as_str())
        {
            return;
        }
    }
}
