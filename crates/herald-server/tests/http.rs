//! The HTTP side against a real server: CORS for browser clients, and when the API is open.

mod common;

use common::{API_KEY, TestServer, assert_refused};
use herald_server::config::AuthMode;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_on_other_origins_may_poll_and_call_the_api() {
    let server = TestServer::start().await;
    let client = reqwest::Client::new();
    let preflight = client
        .request(reqwest::Method::OPTIONS, server.url("/api/publish"))
        .header("origin", "http://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .expect("preflight");
    assert!(preflight.status().is_success());
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");

    let handshake = client
        .get(server.url("/socket.io/?EIO=4&transport=polling"))
        .header("origin", "http://app.example")
        .send()
        .await
        .expect("polling handshake");
    assert_eq!(handshake.status(), 200);
    assert_eq!(handshake.headers()["access-control-allow-origin"], "*");
    let body = handshake.text().await.expect("body");
    assert!(
        body.starts_with("0{") && body.contains("\"sid\""),
        "an Engine.IO open packet: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_origins_are_the_only_ones_allowed() {
    let server =
        TestServer::start_with(|c| c.cors_origins = vec!["http://good.example".into()]).await;
    let client = reqwest::Client::new();
    for (origin, allowed) in [
        ("http://good.example", true),
        ("http://evil.example", false),
    ] {
        let response = client
            .get(server.url("/health"))
            .header("origin", origin)
            .send()
            .await
            .expect("get");
        let header = response
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().ok());
        assert_eq!(header.is_some(), allowed, "{origin}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_its_key_and_is_off_without_one() {
    let server = TestServer::start().await;
    let client = reqwest::Client::new();
    let publish = |key: Option<&'static str>| {
        let mut request = client
            .post(server.url("/api/publish"))
            .json(&json!({"room": "r", "data": 1}));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    assert_eq!(publish(None).await.expect("post").status(), 401);
    assert_eq!(
        publish(Some("wrong-key-123")).await.expect("post").status(),
        401
    );
    let ok = publish(Some(API_KEY)).await.expect("post");
    assert_eq!(ok.status(), 200);
    let body: Value = ok.json().await.expect("json");
    assert_eq!(
        (body["ok"].clone(), body["offset"].clone()),
        (json!(true), json!(1))
    );

    let keyless = TestServer::start_with(|c| c.api_key = None).await;
    let response = client
        .get(keyless.url("/api/stats"))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), 403, "no key: the API is off");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "disabled");

    let dev = TestServer::start_with(|c| {
        c.api_key = None;
        c.auth = AuthMode::Off;
    })
    .await;
    let response = client.get(dev.url("/api/stats")).send().await.expect("get");
    assert_eq!(response.status(), 200, "dev mode opens the API to loopback");
}

/// A batch publish's answers, in order: each message's offset and error code (null where
/// there is none).
fn answers(body: &Value) -> Vec<(Value, Value)> {
    body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| (r["offset"].clone(), r["error"].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_publish_answers_each_message_in_order_and_refuses_bad_ones_alone() {
    let server = TestServer::start_with(|c| c.max_payload = 1024).await;
    let (mut member, _) = common::WsClient::connect(&server, "reader").await;
    for room in ["batch-a", "batch-b"] {
        let ack = member.request(json!({"type": "join", "room": room})).await;
        assert_eq!(ack["ok"], true, "{ack}");
    }
    let http = reqwest::Client::new();
    let post = |body: Value| {
        http.post(server.url("/api/publish"))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
    };
    let messages = json!([
        {"room": "batch-a", "data": {"n": 1}},
        {"room": "batch-b", "data": {"n": 2}, "from": "backend"},
        {"room": "", "data": {"n": 3}},
        {"room": "batch-a", "data": "x".repeat(2048)},
        {"room": "batch-a", "data": {"n": 5}, "from": ""},
        {"room": "batch-a", "data": {"n": 6}},
    ]);
    let response = post(json!({"messages": messages})).await.expect("post");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        answers(&body),
        [
            (json!(1), Value::Null),
            (json!(1), Value::Null),
            (Value::Null, json!("invalid_room")),
            (Value::Null, json!("payload_too_large")),
            (Value::Null, json!("bad_request")),
            (json!(2), Value::Null),
        ],
        "{body}"
    );
    assert_eq!(body["published"], 3);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let m = member.next_pushed("message").await;
        seen.push((
            m["room"].clone(),
            m["offset"].clone(),
            m["from"].clone(),
            m["data"]["n"].clone(),
        ));
    }
    // Each room's messages in the batch's order; rooms are ordered each on its own.
    seen.sort_by_key(|(room, offset, ..)| (room.to_string(), offset.as_u64()));
    assert_eq!(
        seen,
        [
            (json!("batch-a"), json!(1), json!("api"), json!(1)),
            (json!("batch-a"), json!(2), json!("api"), json!(6)),
            (json!("batch-b"), json!(1), json!("backend"), json!(2)),
        ],
        "members get the batch's messages"
    );

    let too_many: Vec<Value> = (0..1001)
        .map(|n| json!({"room": "batch-a", "data": n}))
        .collect();
    let response = post(json!({"messages": too_many})).await.expect("post");
    assert_eq!(response.status(), 400);
    let response = post(json!({"messages": [], "room": "batch-a"}))
        .await
        .expect("post");
    assert_eq!(response.status(), 400);
    let history: Value = http
        .get(server.url("/api/rooms/batch-a/history?since=0"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("history")
        .json()
        .await
        .expect("json");
    assert_eq!(
        history["messages"].as_array().map(Vec::len),
        Some(2),
        "refused batches publish nothing: {history}"
    );
}

/// JSON's syntax allows what no JSON value holds: an escaped half of a UTF-16 surrogate pair
/// (`"\ud800"`, no Unicode character) and numbers beyond a double (`1e999`). PostgreSQL's
/// `jsonb` refuses both, and the socket transports, which parse data into values, refuse them
/// too. The API says so for that message alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_data_no_json_value_holds_and_takes_the_rest() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    let post = |body: &'static str| {
        http.post(server.url("/api/publish"))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let response = post(r#"{"room": "lone", "data": {"s": "\ud800"}}"#)
        .await
        .expect("post");
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("json");
    assert_refused(&body, "bad_request", "surrogate");

    let response = post(
        r#"{"messages": [
            {"room": "lone", "data": "\ud83d\ude00"},
            {"room": "lone", "data": "\udc00"},
            {"room": "lone", "data": "\\ud800"},
            {"room": "lone", "data": [1e999]},
            {"room": "lone", "data": [1e300, 123456789012345678901234567890]}
        ]}"#,
    )
    .await
    .expect("post");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        answers(&body),
        [
            (json!(1), Value::Null),
            (Value::Null, json!("bad_request")),
            (json!(2), Value::Null),
            (Value::Null, json!("bad_request")),
            (json!(3), Value::Null),
        ],
        "a pair, an escaped backslash and large numbers are fine: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_query_gets_the_api_error_shape() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    for path in [
        "/api/rooms/r/history?since=abc",
        "/api/rooms/r/history?limit=-1",
        "/api/rooms/r/presence?since=x",
    ] {
        let response = http
            .get(server.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("get");
        assert_eq!(response.status(), 400, "{path}");
        let body: Value = response.json().await.expect("a JSON body");
        assert_refused(&body, "bad_request", "query");
    }
}
