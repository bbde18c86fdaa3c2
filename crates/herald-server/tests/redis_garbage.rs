//! A stranger publishes garbage on herald's Redis channels: random bytes, truncated msgpack,
//! wrong types, huge length headers, deep nesting, JSON where msgpack is expected and msgpack
//! where JSON is. Instances stay up and ready, count what they could not read, and keep
//! delivering the rooms' messages in order.

mod common;

use std::time::Duration;

use common::{Instance, prefix};
use herald_core::testsuite;
use herald_redis::codec;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// PUBLISHes `payload` on `channel` over a plain RESP connection, as any Redis client could,
/// and returns how many subscribers received it.
async fn publish(redis: &str, channel: &str, payload: &[u8]) -> i64 {
    let url = reqwest::Url::parse(redis).expect("redis url");
    let addr = format!(
        "{}:{}",
        url.host_str().expect("redis host"),
        url.port().unwrap_or(6379)
    );
    let mut stream = TcpStream::connect(addr).await.expect("connect to redis");
    let mut command = Vec::new();
    let mut args: Vec<&[u8]> = vec![b"PUBLISH", channel.as_bytes(), payload];
    let password = url.password().map(str::to_owned);
    let mut auth = Vec::new();
    if let Some(password) = &password {
        auth.extend_from_slice(b"*2\r\n$4\r\nAUTH\r\n");
        auth.extend_from_slice(format!("${}\r\n{password}\r\n", password.len()).as_bytes());
    }
    command.extend_from_slice(&auth);
    command.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args.drain(..) {
        command.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        command.extend_from_slice(arg);
        command.extend_from_slice(b"\r\n");
    }
    stream.write_all(&command).await.expect("write to redis");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if password.is_some() {
        reader.read_line(&mut line).await.expect("AUTH reply");
        assert!(line.starts_with("+OK"), "AUTH: {line}");
        line.clear();
    }
    reader.read_line(&mut line).await.expect("PUBLISH reply");
    line.trim()
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("PUBLISH replied {line:?}"))
}

/// Unreadable on every channel: an array header that promises more than follows.
const PROBE: &[u8] = b"\xdd\x00\x00\x00\x05\xc0";

/// Deterministic pseudo-random bytes (xorshift), so that a failure can be replayed.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// msgpack str header and bytes.
fn mp_str(s: &str) -> Vec<u8> {
    assert!(s.len() < 32);
    let mut out = vec![0xa0 | s.len() as u8];
    out.extend_from_slice(s.as_bytes());
    out
}

/// Everything the stranger publishes. None of it is a request herald should act on.
fn garbage() -> Vec<Vec<u8>> {
    let mut all: Vec<Vec<u8>> = Vec::new();
    // Random bytes of many lengths, and random bytes behind msgpack array/map headers.
    for seed in 0..40u64 {
        all.push(random_bytes(seed, (seed as usize * 37) % 700));
        let mut framed = vec![0x93];
        framed.extend(random_bytes(seed + 1000, 64));
        all.push(framed);
    }
    // A real broadcast, truncated at every length.
    let real = codec::encode_broadcast("stranger", "/", "message", &[], &["lobby"]);
    for cut in 0..real.len() {
        all.push(real[..cut].to_vec());
    }
    // Wrong types where the adapter's format has arrays, maps and strings.
    let wrong: Vec<Vec<u8>> = vec![
        vec![0x93, 0x01, 0x02, 0x03],
        [vec![0x93], mp_str("uid"), mp_str("packet"), vec![0x80]].concat(),
        // {type:"2", data:"message", nsp:5}
        [
            vec![0x93],
            mp_str("uid"),
            vec![0x83],
            mp_str("type"),
            mp_str("2"),
            mp_str("data"),
            mp_str("message"),
            mp_str("nsp"),
            vec![0x05],
            vec![0x90],
        ]
        .concat(),
        // data: [5, nil]: an event name that is not a string.
        [
            vec![0x93],
            mp_str("uid"),
            vec![0x82],
            mp_str("data"),
            vec![0x92, 0x05, 0xc0],
            mp_str("nsp"),
            mp_str("/"),
            vec![0x80],
        ]
        .concat(),
        // An event name that is not UTF-8.
        [
            vec![0x92],
            mp_str("uid"),
            vec![0x81],
            mp_str("data"),
            vec![0x91, 0xa2, 0xff, 0xfe],
        ]
        .concat(),
        // A map keyed by integers and nil.
        vec![0x93, 0xc0, 0x82, 0x01, 0x02, 0xc0, 0xc0, 0x80],
    ];
    all.extend(wrong);
    // Length headers that promise far more than follows.
    all.push(vec![0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0]); // array32 of 4 billion
    all.push(vec![0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0, 0xc0]); // map32 of 4 billion
    all.push(vec![0xdb, 0xff, 0xff, 0xff, 0xff, b'x']); // str32 of 4 GiB
    all.push(vec![0xc6, 0xff, 0xff, 0xff, 0xff, 0x00]); // bin32 of 4 GiB
    all.push(
        [
            vec![0x93],
            mp_str("uid"),
            vec![0xdd, 0x7f, 0xff, 0xff, 0xff],
        ]
        .concat(),
    );
    // Nesting far deeper than any real payload.
    all.push([vec![0x91; 100_000], vec![0xc0]].concat());
    all.push([b"[".repeat(100_000), b"]".repeat(100_000)].concat());
    // JSON where msgpack is expected.
    all.push(
        br#"["uid",{"type":2,"data":["message",{"room":"lobby"}],"nsp":"/"},{"rooms":["lobby"]}]"#
            .to_vec(),
    );
    all.push(br#"{"type":2,"data":["message",{}],"nsp":"/"}"#.to_vec());
    // Requests with wrong types (JSON), and msgpack where JSON is expected.
    for request in [
        json!({"type": "4", "requestId": "r"}),
        json!({"type": 4.5}),
        json!({"type": -1}),
        json!({"type": 99, "requestId": "r"}),
        json!({"type": 7, "packet": 5, "requestId": "r"}),
        json!({"type": 7, "packet": {"data": "x"}}),
        json!({"type": 7, "packet": {"data": [5]}, "opts": {"rooms": 5}}),
    ] {
        all.push(request.to_string().into_bytes());
    }
    all.push(b"{\"type\":0,".to_vec());
    all.push(b"{not json".to_vec());
    all.push(vec![0x81, 0xa4, b't', b'y', b'p', b'e']); // {type: <missing>}
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_herald_channels_is_counted_and_ignored() {
    let (redis, key) = (testsuite::redis_url(), prefix());
    let mut fleet = [
        Instance::start(&redis, &key, "a", &[]),
        Instance::start(&redis, &key, "b", &[]),
    ];
    for instance in &fleet {
        instance.wait_ready(true).await;
    }
    let mut alice = fleet[0].client("alice").await;
    let mut bob = fleet[1].client("bob").await;
    for client in [&mut alice, &mut bob] {
        let ack = client
            .request(json!({"type": "join", "room": "lobby"}))
            .await;
        assert_eq!(ack["ok"], true, "{ack}");
    }
    let ack = bob
        .request(json!({"type": "message", "room": "lobby", "data": "before"}))
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let first = alice.next_pushed("message").await;
    assert_eq!(
        (first["offset"].as_u64(), &first["data"]),
        (Some(1), &json!("before"))
    );

    let garbage = garbage();
    let broadcast = format!("{key}#/#");
    let room = format!("{key}#/#lobby#");
    let request = format!("{key}-request#/#");
    let response = format!("{key}-response#/#");
    // Both instances hold the namespace, room (alice and bob are in lobby) and request
    // channels; the probe is unreadable on every one of them.
    for channel in [&broadcast, &room, &request] {
        assert_eq!(publish(&redis, channel, PROBE).await, 2, "{channel}");
    }
    for payload in &garbage {
        for channel in [&broadcast, &room, &request, &response] {
            publish(&redis, channel, payload).await;
        }
    }
    for (i, instance) in fleet.iter_mut().enumerate() {
        assert!(
            instance.child.try_wait().expect("wait").is_none(),
            "instance {i} exited"
        );
    }
    for channel in [&broadcast, &room, &request] {
        assert_eq!(publish(&redis, channel, PROBE).await, 2, "{channel}");
    }

    // Every unreadable payload is counted: on the namespace and room channels those the codec
    // refuses, on the request channel those the request decoder refuses, and the probes.
    let bad_broadcasts = garbage
        .iter()
        .filter(|p| codec::decode_broadcast(p).is_err())
        .count();
    let bad_requests = garbage
        .iter()
        .filter(|p| codec::decode_request(p).is_err())
        .count();
    let expected = (2 * bad_broadcasts + bad_requests + 6) as f64;
    assert!(
        bad_broadcasts > garbage.len() / 2,
        "most of it is unreadable"
    );
    for instance in &fleet {
        let mut counted = 0.0;
        for _ in 0..100 {
            counted = instance.metric("herald_broker_decode_errors_total").await;
            if counted >= expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            counted, expected,
            "decode errors counted on {}",
            instance.addr
        );
    }

    // Still up, healthy and ready.
    for instance in &fleet {
        let health = reqwest::get(instance.url("/health")).await.expect("health");
        assert_eq!(health.status(), 200);
        assert!(instance.ready().await, "{} still ready", instance.addr);
    }

    // The room goes on: the next messages reach both members, in order, after the garbage.
    for i in 0..3 {
        let ack = bob
            .request(json!({"type": "message", "room": "lobby", "data": ["after", i]}))
            .await;
        assert_eq!(ack["ok"], true, "{ack}");
    }
    for client in [&mut alice, &mut bob] {
        let mut offsets = Vec::new();
        while offsets.len() < 3 {
            let m = client.next_pushed("message").await;
            let offset = m["offset"].as_u64().expect("offset");
            if offset == 1 {
                continue; // bob's own copy of the first message
            }
            assert_eq!(m["data"], json!(["after", offsets.len()]), "{m}");
            offsets.push(offset);
        }
        assert_eq!(offsets, vec![2, 3, 4]);
    }
    // And a newcomer can still join and publish.
    let mut carol = fleet[0].client("carol").await;
    let ack = carol
        .request(json!({"type": "join", "room": "lobby"}))
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
}
