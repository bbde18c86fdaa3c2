//! Prometheus metrics: the names herald exports and the recorder that renders them.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS: &str = "herald_connections";
pub const ROOMS: &str = "herald_rooms";
pub const MESSAGES_PUBLISHED: &str = "herald_messages_published_total";
pub const MESSAGES_DELIVERED: &str = "herald_messages_delivered_total";
pub const MESSAGES_DROPPED: &str = "herald_messages_dropped_total";
pub const DELIVERY_LATENCY: &str = "herald_delivery_latency_seconds";
pub const EVENTS_REJECTED: &str = "herald_events_rejected_total";
pub const AUTH_FAILURES: &str = "herald_auth_failures_total";
pub const RATE_LIMITED: &str = "herald_rate_limited_total";
pub const SLOW_CONSUMER_DISCONNECTS: &str = "herald_slow_consumer_disconnects_total";
pub const CONNECTIONS_REFUSED: &str = "herald_connections_refused_total";

/// Installs the global recorder once per process and returns the handle `/metrics` renders.
/// Several servers in one process (as in tests) share it.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ];
            // Only an empty bucket list is refused, and this one is not.
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(DELIVERY_LATENCY.into()), &buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new())
                .build_recorder();
            let handle = recorder.handle();
            spawn_upkeep(handle.clone());
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            // Scrapers see every series from the first scrape, at zero.
            for name in [
                MESSAGES_PUBLISHED,
                MESSAGES_DELIVERED,
                EVENTS_REJECTED,
                AUTH_FAILURES,
            ] {
                metrics::counter!(name).absolute(0);
            }
            for transport in ["ws", "socketio"] {
                metrics::counter!(SLOW_CONSUMER_DISCONNECTS, "transport" => transport).absolute(0);
            }
            metrics::gauge!(ROOMS).set(0.0);
            handle
        })
        .clone()
}

/// How often histogram samples are folded into their buckets and summaries.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The recorder keeps every histogram sample until it is folded in, which otherwise happens
/// only when `/metrics` is scraped: without a scraper an instance's memory grew by every
/// delivery's latency sample. A thread of its own folds them in every [`UPKEEP_INTERVAL`],
/// whichever runtime (or none) the process has.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no metrics upkeep thread; histograms grow until scraped");
    }
}

fn describe() {
    describe_gauge!(
        CONNECTIONS,
        "Open client connections, by transport and namespace"
    );
    describe_gauge!(ROOMS, "Rooms with at least one local member");
    describe_counter!(
        MESSAGES_PUBLISHED,
        "Messages published through this instance"
    );
    describe_counter!(MESSAGES_DELIVERED, "Deliveries to local connections");
    describe_counter!(MESSAGES_DROPPED, "Deliveries dropped, by reason");
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "Publish-to-local-delivery latency"
    );
    describe_counter!(EVENTS_REJECTED, "Client events refused, by error code");
    describe_counter!(
        AUTH_FAILURES,
        "Handshakes refused for a bad, missing or expired token"
    );
    describe_counter!(
        SLOW_CONSUMER_DISCONNECTS,
        "Connections closed because they fell behind, by transport"
    );
    describe_counter!(
        RATE_LIMITED,
        "Events and connections refused for their rate, by scope (connection, user, ip)"
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections refused at the door, by reason and transport"
    );
}
