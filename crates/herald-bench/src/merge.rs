//! `--merge`: one report from the JSON results of a run's shards (generator processes).
//!
//! Counts and failure reasons add up; latency histograms merge exactly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::latency::{from_pairs, percentiles, spectrum, to_pairs};
use crate::report::{Histograms, Report, SeriesPoint};

pub fn merge_files(paths: &[PathBuf], label: &str) -> anyhow::Result<Report> {
    let reports = paths
        .iter()
        .map(|p| read(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    merge(reports, label)
}

fn read(path: &Path) -> anyhow::Result<Report> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a bench result", path.display()))
}

fn add_maps(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (reason, n) in from {
        *into.entry(reason.clone()).or_default() += n;
    }
}

fn merge_pairs(reports: &[Report], pick: fn(&Histograms) -> &Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut total = from_pairs(&[]);
    for r in reports {
        // Same bounds on both sides, so `add` cannot fail.
        let _ = total.add(from_pairs(pick(&r.histograms)));
    }
    to_pairs(&total)
}

/// One report for the whole run. Servers and other watched processes are taken from the
/// first shard (every shard watched the same ones); generators are added up.
pub fn merge(reports: Vec<Report>, label: &str) -> anyhow::Result<Report> {
    let Some(first) = reports.first() else {
        bail!("--merge needs at least one result");
    };
    let mut out = first.clone();
    out.label = label.to_owned();
    let rest = &reports[1..];

    let c = &mut out.connect;
    for r in rest {
        c.attempted += r.connect.attempted;
        c.connected += r.connect.connected;
        c.connect_failed += r.connect.connect_failed;
        c.join_failed += r.connect.join_failed;
        add_maps(&mut c.failures, &r.connect.failures);
        c.setup_seconds = c.setup_seconds.max(r.connect.setup_seconds);
        if r.connect.connected > 0 {
            c.first_attempt_unix_us = c.first_attempt_unix_us.min(r.connect.first_attempt_unix_us);
            c.last_connected_unix_us = c
                .last_connected_unix_us
                .max(r.connect.last_connected_unix_us);
        }
    }
    c.seconds = c
        .last_connected_unix_us
        .saturating_sub(c.first_attempt_unix_us) as f64
        / 1e6;
    c.rate_per_s = if c.seconds > 0.0 {
        c.connected as f64 / c.seconds
    } else {
        0.0
    };

    let p = &mut out.publish;
    for r in rest {
        p.sent += r.publish.sent;
        p.acked_ok += r.publish.acked_ok;
        p.ack_failed += r.publish.ack_failed;
        add_maps(&mut p.ack_errors, &r.publish.ack_errors);
        p.unacked += r.publish.unacked;
        p.throttled += r.publish.throttled;
        p.seconds = p.seconds.max(r.publish.seconds);
        p.rate_per_s += r.publish.rate_per_s;
    }

    let d = &mut out.delivery;
    for r in rest {
        let t = &r.delivery.tally;
        d.tally.expected += t.expected;
        d.tally.received += t.received;
        d.tally.matched += t.matched;
        d.tally.lost += t.lost;
        d.tally.duplicates += t.duplicates;
        d.tally.unexpected += t.unexpected;
        d.tally.stale += t.stale;
        d.rate_per_s += r.delivery.rate_per_s;
        d.overall_rate_per_s += r.delivery.overall_rate_per_s;
        d.drain_seconds = d.drain_seconds.max(r.delivery.drain_seconds);
    }

    for r in rest {
        add_maps(&mut out.disconnects, &r.disconnects);
        out.unreadable_frames += r.unreadable_frames;
        out.processes.extend(
            r.processes
                .iter()
                .filter(|p| p.role == "generator")
                .cloned(),
        );
        out.cpu.generator_connect_pct += r.cpu.generator_connect_pct;
        out.cpu.generator_run_pct += r.cpu.generator_run_pct;
        for (i, point) in r.series.iter().enumerate() {
            if let Some(mine) = out.series.get_mut(i) {
                add_point(mine, point);
            }
        }
    }
    out.cpu.others_run_pct = (out.cpu.machine_run_pct
        - out.cpu.servers_run_pct
        - out.cpu.aux_run_pct
        - out.cpu.generator_run_pct)
        .max(0.0);
    if let Some(per) = out.rss_per_connection_kib.as_mut()
        && out.connect.connected > 0
        && first.connect.connected > 0
    {
        // The first shard saw the servers' whole growth, from all shards' connections.
        *per = *per * first.connect.connected as f64 / out.connect.connected as f64;
    }

    out.histograms = Histograms {
        all: merge_pairs(&reports, |h| &h.all),
        cross: merge_pairs(&reports, |h| &h.cross),
        own: merge_pairs(&reports, |h| &h.own),
        ack: merge_pairs(&reports, |h| &h.ack),
        connect: merge_pairs(&reports, |h| &h.connect),
    };
    let all = from_pairs(&out.histograms.all);
    out.latency = percentiles(&all);
    out.spectrum = spectrum(&all);
    if out.own_message_latency.is_some() {
        out.own_message_latency = Some(percentiles(&from_pairs(&out.histograms.own)));
    }
    if out.cross_instance_latency.is_some() {
        out.cross_instance_latency = Some(percentiles(&from_pairs(&out.histograms.cross)));
    }
    out.publish.ack_latency = percentiles(&from_pairs(&out.histograms.ack));
    out.connect.latency = percentiles(&from_pairs(&out.histograms.connect));
    out.checks.clear();
    Ok(out)
}

/// Adds a shard's second to another's: rates add up; latency percentiles cannot be added,
/// so the worse of the two is kept.
fn add_point(into: &mut SeriesPoint, from: &SeriesPoint) {
    into.delivered_per_s += from.delivered_per_s;
    into.published_per_s += from.published_per_s;
    into.p50_ms = into.p50_ms.max(from.p50_ms);
    into.p90_ms = into.p90_ms.max(from.p90_ms);
    into.p99_ms = into.p99_ms.max(from.p99_ms);
    into.max_ms = into.max_ms.max(from.max_ms);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::histogram;

    /// A shard's result with `connected` clients, `lost` deliveries and latencies `us`.
    fn shard(connected: u64, first_us: u64, last_us: u64, lost: u64, us: &[u64]) -> Report {
        let mut h = histogram();
        for v in us {
            h.record(*v).expect("in range");
        }
        let p = serde_json::to_value(percentiles(&h)).expect("json");
        let value = serde_json::json!({
            "label": "shard",
            "scenario": {"transport": "sio", "urls": ["a", "b"], "clients": 4, "rooms": 2,
                "members": 2, "senders": 2, "rate": 10.0, "count": null, "payload_bytes": 100,
                "duration_s": 1.0, "idle": false, "connect_concurrency": 10, "threads": 2,
                "bind": []},
            "connect": {"attempted": connected, "connected": connected, "connect_failed": 0,
                "join_failed": 0, "failures": {"timeout": 1}, "seconds": 1.0, "rate_per_s": 1.0,
                "latency": p, "setup_seconds": 1.0, "first_attempt_unix_us": first_us,
                "last_connected_unix_us": last_us},
            "publish": {"sent": 10, "acked_ok": 10, "ack_failed": 0, "ack_errors": {},
                "unacked": 0, "throttled": 0, "seconds": 1.0, "rate_per_s": 10.0,
                "ack_latency": p},
            "delivery": {"expected": 20, "received": 20 - lost, "matched": 20 - lost,
                "lost": lost, "duplicates": 0, "unexpected": 0, "stale": 0, "rate_per_s": 20.0,
                "overall_rate_per_s": 20.0, "drain_seconds": 0.1},
            "latency": p, "cross_instance_latency": p, "spectrum": [], "disconnects": {},
            "unreadable_frames": 0, "processes": [], "rss_per_connection_kib": null,
            "cpu": {"cores": 2, "connect_seconds": 1.0, "run_seconds": 1.0,
                "servers_connect_pct": 10.0, "servers_run_pct": 50.0, "aux_run_pct": 0.0,
                "generator_connect_pct": 5.0, "generator_run_pct": 20.0,
                "machine_connect_pct": 20.0, "machine_run_pct": 100.0, "others_run_pct": 30.0},
            "series": [], "checks": [],
            "histograms": {"all": to_pairs(&h), "cross": to_pairs(&h), "ack": to_pairs(&h),
                "connect": to_pairs(&h)}
        });
        serde_json::from_value(value).expect("a report")
    }

    #[test]
    fn shards_add_up_and_percentiles_come_from_the_merged_histograms() {
        let a = shard(2, 1_000_000, 2_000_000, 0, &[1_000; 99]);
        let b = shard(2, 1_500_000, 3_000_000, 3, &[100_000]);
        let merged = merge(vec![a, b], "all").expect("merged");
        assert_eq!(merged.label, "all");
        assert_eq!(merged.connect.connected, 4);
        assert_eq!(merged.connect.failures.get("timeout"), Some(&2));
        // One window from the first attempt to the last connect over both shards.
        assert!((merged.connect.seconds - 2.0).abs() < 1e-9);
        assert!((merged.connect.rate_per_s - 2.0).abs() < 1e-9);
        assert_eq!(merged.delivery.tally.expected, 40);
        assert_eq!(merged.delivery.tally.lost, 3);
        assert!((merged.delivery.rate_per_s - 40.0).abs() < 1e-9);
        assert_eq!(merged.publish.sent, 20);
        // 100 samples: 99 at 1 ms and one at 100 ms.
        assert_eq!(merged.latency.count, 100);
        assert!((merged.latency.p50_ms - 1.0).abs() < 0.01);
        assert!((merged.latency.max_ms - 100.0).abs() < 0.1);
        assert!((merged.cpu.generator_run_pct - 40.0).abs() < 1e-9);
        assert!((merged.cpu.others_run_pct - 10.0).abs() < 1e-9);
    }

    #[test]
    fn nothing_to_merge_is_an_error() {
        assert!(merge(Vec::new(), "x").is_err());
    }
}
