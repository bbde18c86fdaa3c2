//! Publishers on the HTTP API (`--api-batch`): each POSTs batches of messages to
//! `/api/publish` at its share of the rate, and accounts for every answer as the socket
//! senders do for their acks, so that deliveries to the clients are checked the same way.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Deserialize;

use crate::client::{Ctx, Phase, Stats};
use crate::proto::{self, Probe};

/// One publisher's share of a run.
pub struct Publisher {
    /// Told apart from the clients in probes and in the latency recorder.
    pub id: usize,
    /// `http://host:port`.
    pub base: String,
    pub key: Option<String>,
    pub batch: usize,
    /// Time between two batches of this publisher.
    pub interval: Duration,
    /// This publisher's first room; it goes round the rooms from there.
    pub first_room: usize,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    results: Vec<Reply>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Reply {
    ok: bool,
    offset: Option<u64>,
    error: Option<String>,
}

/// Publishes while the run is in its sending phase; returns (room, offset) of every message
/// the server accepted.
pub async fn run(ctx: &Ctx, http: reqwest::Client, p: Publisher) -> Vec<(u32, u64)> {
    let mut acked = Vec::new();
    let mut phase = ctx.phase.clone();
    while *phase.borrow_and_update() == Phase::Setup {
        if phase.changed().await.is_err() {
            return acked;
        }
    }
    let rooms = ctx.room_json.len();
    if rooms == 0 {
        return acked;
    }
    let url = format!("{}/api/publish", p.base);
    let mut ticker = tokio::time::interval(p.interval.max(Duration::from_micros(1)));
    // A slow server is offered less, never a burst to catch up.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut seq = 0u64;
    let mut next_room = p.first_room;
    while *phase.borrow() == Phase::Run {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = phase.changed() => continue,
        }
        let sent_us = ctx.clock.now_us();
        let mut body = String::from("{\"messages\":[");
        let mut batch_rooms = Vec::with_capacity(p.batch);
        for k in 0..p.batch {
            let room = next_room % rooms;
            next_room += 1;
            let probe = Probe {
                t: sent_us,
                s: p.id as u64,
                n: seq,
            };
            seq += 1;
            if k > 0 {
                body.push(',');
            }
            body.push_str(&format!(
                "{{\"room\":{},\"data\":{}}}",
                ctx.room_json[room],
                proto::probe_data(probe, &ctx.pad)
            ));
            batch_rooms.push(room as u32);
        }
        body.push_str("]}");
        ctx.stats.sent.fetch_add(p.batch as u64, Ordering::Relaxed);
        let mut request = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = &p.key {
            request = request.bearer_auth(key);
        }
        let answer = match request.send().await {
            Ok(response) => response.json::<Answer>().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        ctx.recorder
            .ack(p.id, ctx.clock.now_us().saturating_sub(sent_us));
        let replies = match answer {
            Ok(answer) if answer.results.len() == batch_rooms.len() => answer.results,
            Ok(answer) => {
                let reason = answer
                    .error
                    .unwrap_or_else(|| "batch not answered".to_owned());
                refused(&ctx.stats, batch_rooms.len(), reason);
                continue;
            }
            Err(e) => {
                refused(
                    &ctx.stats,
                    batch_rooms.len(),
                    format!("request failed: {e}"),
                );
                continue;
            }
        };
        for (room, reply) in batch_rooms.into_iter().zip(replies) {
            match (reply.ok, reply.offset) {
                (true, Some(offset)) => {
                    acked.push((room, offset));
                    let members = ctx.room_joined[room as usize].load(Ordering::Relaxed);
                    ctx.stats.expected.fetch_add(members, Ordering::Relaxed);
                    ctx.stats.acked_ok.fetch_add(1, Ordering::Relaxed);
                }
                _ => refused(
                    &ctx.stats,
                    1,
                    reply.error.unwrap_or_else(|| "refused".to_owned()),
                ),
            }
        }
    }
    acked
}

fn refused(stats: &Stats, n: usize, reason: String) {
    stats.ack_failed.fetch_add(n as u64, Ordering::Relaxed);
    let mut errors = stats.ack_errors.lock().unwrap_or_else(|p| p.into_inner());
    *errors.entry(reason).or_default() += n as u64;
}
