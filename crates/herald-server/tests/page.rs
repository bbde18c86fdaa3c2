//! The test page at `/`: its files come from the binary, `/stats.json` counts without naming
//! rooms or users, and `POST /dev/token` exists only in dev mode.

mod common;

use common::{TestServer, WsClient};
use herald_server::config::AuthMode;
use serde_json::{Value, json};

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn mint(server: &TestServer, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(server.url("/dev/token"))
        .json(&body)
        .send()
        .await
        .expect("post /dev/token")
}

async fn stats(server: &TestServer) -> Value {
    let response = reqwest::get(server.url("/stats.json"))
        .await
        .expect("get /stats.json");
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_assets_are_served_from_the_binary() {
    let server = TestServer::start().await;
    let page = reqwest::get(server.url("/")).await.expect("get /");
    assert_eq!(page.status(), 200);
    assert!(header(&page, "content-type").starts_with("text/html"));
    let html = page.text().await.expect("body");
    for asset in [
        "/assets/socket.io.min.js",
        "/assets/app.js",
        "/assets/app.css",
    ] {
        assert!(html.contains(asset), "the page loads {asset}");
    }

    for (path, content_type) in [
        ("/assets/socket.io.min.js", "text/javascript"),
        ("/assets/app.js", "text/javascript"),
        ("/assets/app.css", "text/css"),
    ] {
        let response = reqwest::get(server.url(path)).await.expect("get asset");
        assert_eq!(response.status(), 200, "{path}");
        assert!(
            header(&response, "content-type").starts_with(content_type),
            "{path}"
        );
        assert!(!header(&response, "cache-control").is_empty(), "{path}");
    }

    let vendored = reqwest::get(server.url("/assets/socket.io.min.js"))
        .await
        .expect("get socket.io.min.js");
    assert!(header(&vendored, "cache-control").contains("max-age="));
    let text = vendored.text().await.expect("body");
    assert!(
        text.starts_with("/*!\n * Socket.IO v4.8."),
        "the license header is intact"
    );

    let missing = reqwest::get(server.url("/assets/nope.js"))
        .await
        .expect("get");
    assert_eq!(missing.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_token_is_a_404_when_a_jwt_secret_is_set() {
    let server = TestServer::start().await;
    let response = mint(&server, json!({"sub": "alice"})).await;
    assert_eq!(response.status(), 404);
    assert_eq!(stats(&server).await["dev_mode"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_dev_mode_dev_token_mints_tokens_the_server_accepts() {
    // No JWT secret: the generated development secret signs and verifies.
    let server = TestServer::start_with(|c| c.jwt_secret = None).await;
    assert_eq!(stats(&server).await["dev_mode"], true);
    let response = mint(&server, json!({"sub": "dora", "rooms": ["demo*"]})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "cache-control"), "no-store");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["sub"], "dora");
    assert_eq!(body["expires_in"], 3600);
    let token = body["token"].as_str().expect("a token");
    let url = format!("ws://{}/ws?token={token}", server.addr);
    let (mut client, session) = WsClient::connect_url(&url).await;
    assert_eq!(session["user"], "dora");
    let ack = client
        .request(json!({"type": "join", "room": "demo-1"}))
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let ack = client
        .request(json!({"type": "join", "room": "other"}))
        .await;
    assert_eq!(ack["error"], "forbidden", "the token's rooms apply: {ack}");

    for bad in [
        json!({}),
        json!({"sub": ""}),
        json!({"sub": "has space!"}),
        json!({"sub": "x", "ttl": 99999}),
        json!({"sub": "x", "rooms": [""]}),
    ] {
        let response = mint(&server, bad.clone()).await;
        assert_eq!(response.status(), 400, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_sites_cannot_mint_dev_tokens() {
    let server = TestServer::start_with(|c| c.jwt_secret = None).await;
    let post = |origin: String| {
        reqwest::Client::new()
            .post(server.url("/dev/token"))
            .header("origin", origin)
            .json(&json!({"sub": "mallory"}))
            .send()
    };
    let own = post(format!("http://{}", server.addr)).await.expect("post");
    assert_eq!(own.status(), 200);
    let other = post("http://evil.example".into()).await.expect("post");
    assert_eq!(other.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_on_only_this_machine_mints_dev_tokens() {
    // A plain start: auth on, no JWT_SECRET. A proxy on loopback forwards a remote client.
    let trust = |c: &mut herald_server::config::Config| {
        c.trusted_proxies = vec!["127.0.0.1".parse().expect("range")];
    };
    let post = |server: &TestServer, forwarded: Option<&'static str>| {
        let mut request = reqwest::Client::new()
            .post(server.url("/dev/token"))
            .json(&json!({"sub": "mallory"}));
        if let Some(address) = forwarded {
            request = request.header("x-forwarded-for", address);
        }
        request.send()
    };
    let server = TestServer::start_with(|c| {
        c.jwt_secret = None;
        trust(c);
    })
    .await;
    let local = post(&server, None).await.expect("post");
    assert_eq!(local.status(), 200, "a client on this machine");
    let remote = post(&server, Some("203.0.113.9")).await.expect("post");
    assert_eq!(remote.status(), 403);
    let body: Value = remote.json().await.expect("json");
    common::assert_refused(&body, "forbidden", "herald token --sub");

    // With auth off everyone is admitted anyway, and the page works from anywhere.
    let open = TestServer::start_with(|c| {
        c.auth = AuthMode::Off;
        trust(c);
    })
    .await;
    let remote = post(&open, Some("203.0.113.9")).await.expect("post");
    assert_eq!(remote.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_off_dev_tokens_are_signed_with_the_configured_secret() {
    let server = TestServer::start_with(|c| c.auth = AuthMode::Off).await;
    let response = mint(&server, json!({"sub": "frank"})).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    let url = format!(
        "ws://{}/ws?token={}",
        server.addr,
        body["token"].as_str().expect("token")
    );
    let (_client, session) = WsClient::connect_url(&url).await;
    assert_eq!(session["user"], "frank", "not an anonymous user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_json_counts_without_naming_rooms_or_users() {
    let server = TestServer::start().await;
    let (mut client, _) = WsClient::connect(&server, "erin-the-user").await;
    let ack = client
        .request(json!({"type": "join", "room": "secret-room"}))
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let ack = client
        .request(json!({"type": "message", "room": "secret-room", "data": "hi"}))
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    client.next_pushed("message").await;

    let stats = stats(&server).await;
    let mut keys: Vec<&str> = stats
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "connections",
            "delivered",
            "dev_mode",
            "instance",
            "published",
            "uptime_seconds"
        ]
    );
    assert_eq!(stats["instance"], "rust-test");
    assert_eq!(stats["connections"], 1);
    // The counters are process-wide, and other tests in this binary publish too.
    assert!(
        stats["published"].as_u64().expect("a count") >= 1,
        "{stats}"
    );
    assert!(
        stats["delivered"].as_u64().expect("a count") >= 1,
        "{stats}"
    );
    let text = stats.to_string();
    assert!(
        !text.contains("secret-room") && !text.contains("erin"),
        "{text}"
    );
}
