//! The result of a run: JSON, summary table, one-line figures and pass/fail checks.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::accounting::Tally;
use crate::args::Transport;
use crate::latency::{Percentiles, SpectrumPoint};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scenario {
    pub transport: Transport,
    pub urls: Vec<String>,
    pub clients: usize,
    pub rooms: usize,
    pub members: usize,
    pub senders: usize,
    pub rate: f64,
    pub count: Option<u64>,
    pub payload_bytes: usize,
    pub duration_s: f64,
    pub idle: bool,
    pub connect_concurrency: usize,
    pub threads: usize,
    pub bind: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectReport {
    pub attempted: u64,
    pub connected: u64,
    pub connect_failed: u64,
    pub join_failed: u64,
    /// Failures by reason, connects and joins.
    pub failures: BTreeMap<String, u64>,
    /// From the first attempt to the last successful connection.
    pub seconds: f64,
    pub rate_per_s: f64,
    /// TCP connect to Socket.IO connect (or /ws upgrade).
    pub latency: Percentiles,
    /// From the first attempt until every client had joined its rooms (or failed).
    pub setup_seconds: f64,
    /// Wall clock (µs since the Unix epoch) of the first attempt and the last connect, so
    /// that merged shards get one window.
    pub first_attempt_unix_us: u64,
    pub last_connected_unix_us: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishReport {
    pub sent: u64,
    pub acked_ok: u64,
    pub ack_failed: u64,
    pub ack_errors: BTreeMap<String, u64>,
    pub unacked: u64,
    /// Sends skipped because the sender had --max-inflight acks outstanding.
    pub throttled: u64,
    /// The sending window.
    pub seconds: f64,
    pub rate_per_s: f64,
    pub ack_latency: Percentiles,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryReport {
    #[serde(flatten)]
    pub tally: Tally,
    /// Deliveries received during the sending window, per second of it.
    pub rate_per_s: f64,
    /// All deliveries, including those drained after sending stopped, per second of the
    /// whole window.
    pub overall_rate_per_s: f64,
    pub drain_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcReport {
    pub pid: u32,
    pub name: String,
    /// server, aux or generator.
    pub role: String,
    pub rss_start_kib: u64,
    pub rss_connected_kib: u64,
    /// At the end of the run, connections still open.
    pub rss_loaded_kib: u64,
    pub rss_max_kib: u64,
    /// CPU in percent of one core while connecting.
    pub cpu_connect_pct: f64,
    /// CPU in percent of one core while sending and draining (or holding, when idle).
    pub cpu_run_pct: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CpuReport {
    pub cores: usize,
    pub connect_seconds: f64,
    pub run_seconds: f64,
    /// All in percent of one core.
    pub servers_connect_pct: f64,
    pub servers_run_pct: f64,
    pub aux_run_pct: f64,
    pub generator_connect_pct: f64,
    pub generator_run_pct: f64,
    pub machine_connect_pct: f64,
    pub machine_run_pct: f64,
    /// The machine's interrupt and softirq time while running (the kernel may count it in
    /// the process it interrupted too).
    #[serde(default)]
    pub irq_run_pct: f64,
    /// The machine's busy time not accounted for by the processes above.
    pub others_run_pct: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeriesPoint {
    /// Seconds since sending (or holding) started.
    pub t_s: f64,
    pub delivered_per_s: f64,
    pub published_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub servers_rss_kib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub value: f64,
    pub op: String,
    pub target: f64,
    pub unit: String,
    pub pass: bool,
}

impl Check {
    pub fn at_most(name: &str, value: f64, target: f64, unit: &str) -> Self {
        Self {
            name: name.to_owned(),
            value,
            op: "<=".to_owned(),
            target,
            unit: unit.to_owned(),
            pass: value <= target,
        }
    }

    pub fn at_least(name: &str, value: f64, target: f64, unit: &str) -> Self {
        Self {
            name: name.to_owned(),
            value,
            op: ">=".to_owned(),
            target,
            unit: unit.to_owned(),
            pass: value >= target,
        }
    }

    fn line(&self) -> String {
        let unit = if self.unit.is_empty() {
            String::new()
        } else {
            format!(" {}", self.unit)
        };
        format!(
            "{} {} {}{unit}: {}{unit} {}",
            self.name,
            self.op,
            num(self.target),
            num(self.value),
            if self.pass { "PASS" } else { "FAIL" },
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub label: String,
    pub scenario: Scenario,
    pub connect: ConnectReport,
    pub publish: PublishReport,
    pub delivery: DeliveryReport,
    pub latency: Percentiles,
    /// Deliveries whose sender was connected to another instance.
    pub cross_instance_latency: Option<Percentiles>,
    /// Deliveries of a sender's own messages back to it.
    #[serde(default)]
    pub own_message_latency: Option<Percentiles>,
    pub spectrum: Vec<SpectrumPoint>,
    pub disconnects: BTreeMap<String, u64>,
    pub unreadable_frames: u64,
    pub processes: Vec<ProcReport>,
    /// (servers' RSS at the end − at the start) / connections.
    pub rss_per_connection_kib: Option<f64>,
    pub cpu: CpuReport,
    pub series: Vec<SeriesPoint>,
    pub checks: Vec<Check>,
    /// The distributions behind the percentiles, for --merge.
    pub histograms: Histograms,
}

/// Latency histograms as (µs, count) pairs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Histograms {
    pub all: Vec<(u64, u64)>,
    pub cross: Vec<(u64, u64)>,
    #[serde(default)]
    pub own: Vec<(u64, u64)>,
    pub ack: Vec<(u64, u64)>,
    pub connect: Vec<(u64, u64)>,
}

/// A number with sensible precision for humans.
pub fn num(v: f64) -> String {
    if v == 0.0 {
        // Also -0.0, which an empty sum of floats yields.
        "0".to_owned()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn reasons(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = map.iter().map(|(r, n)| format!("{n}× {r}")).collect();
    format!(" ({})", parts.join("; "))
}

fn pct_line(p: &Percentiles) -> String {
    format!(
        "p50 {} ms, p90 {} ms, p99 {} ms, p99.9 {} ms, max {} ms ({} samples)",
        num(p.p50_ms),
        num(p.p90_ms),
        num(p.p99_ms),
        num(p.p999_ms),
        num(p.max_ms),
        p.count
    )
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.pass)
    }

    /// One line per figure, each starting with the label.
    pub fn figure_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let c = &self.connect;
        lines.push(format!(
            "connections: {} of {} connected, {} connect failures, {} join failures{}",
            c.connected,
            c.attempted,
            c.connect_failed,
            c.join_failed,
            reasons(&c.failures)
        ));
        lines.push(format!(
            "connect rate: {} conn/s ({} in {} s; handshake p50 {} ms, p99 {} ms)",
            num(c.rate_per_s),
            c.connected,
            num(c.seconds),
            num(c.latency.p50_ms),
            num(c.latency.p99_ms)
        ));
        if !self.scenario.idle && self.publish.sent > 0 {
            let p = &self.publish;
            lines.push(format!(
                "published: {} msgs/s ({} sent, {} acked ok, {} refused{}, {} unacked, {} throttled)",
                num(p.rate_per_s),
                p.sent,
                p.acked_ok,
                p.ack_failed,
                reasons(&p.ack_errors),
                p.unacked,
                p.throttled
            ));
            lines.push(format!(
                "delivered: {} msgs/s over the sending window",
                num(self.delivery.rate_per_s)
            ));
            lines.push(format!("latency: {}", pct_line(&self.latency)));
            if let Some(cross) = &self.cross_instance_latency {
                lines.push(format!("cross-instance latency: {}", pct_line(cross)));
            }
            if let Some(own) = &self.own_message_latency {
                lines.push(format!("own-message latency: {}", pct_line(own)));
            }
            let t = &self.delivery.tally;
            lines.push(format!(
                "loss: {} of {} expected deliveries lost, {} duplicates, {} unexpected",
                t.lost, t.expected, t.duplicates, t.unexpected
            ));
        }
        let disconnected: u64 = self.disconnects.values().sum();
        lines.push(format!(
            "disconnects: {disconnected}{}",
            reasons(&self.disconnects)
        ));
        if let Some(per) = self.rss_per_connection_kib {
            let servers: Vec<String> = self
                .processes
                .iter()
                .filter(|p| p.role == "server")
                .map(|p| {
                    format!(
                        "{} {}: {} → {} MiB",
                        p.name,
                        p.pid,
                        num(p.rss_start_kib as f64 / 1024.0),
                        num(p.rss_loaded_kib as f64 / 1024.0)
                    )
                })
                .collect();
            lines.push(format!(
                "rss per connection: {} KiB ({})",
                num(per),
                servers.join(", ")
            ));
        }
        let cpu = &self.cpu;
        let mut cpu_line = format!(
            "cpu while {}: servers {}%, generator {}%",
            if self.scenario.idle {
                "holding"
            } else {
                "sending"
            },
            num(cpu.servers_run_pct),
            num(cpu.generator_run_pct)
        );
        if self.processes.iter().any(|p| p.role == "aux") {
            let _ = write!(cpu_line, ", aux {}%", num(cpu.aux_run_pct));
        }
        let _ = write!(
            cpu_line,
            ", other {}%, machine {}% of {}00% of which irq+softirq {}% (percent of one core)",
            num(cpu.others_run_pct),
            num(cpu.machine_run_pct),
            cpu.cores,
            num(cpu.irq_run_pct)
        );
        lines.push(cpu_line);
        lines.push(format!(
            "cpu while connecting: servers {}%, generator {}%, machine {}% over {} s",
            num(cpu.servers_connect_pct),
            num(cpu.generator_connect_pct),
            num(cpu.machine_connect_pct),
            num(cpu.connect_seconds)
        ));
        for check in &self.checks {
            lines.push(format!("check {}", check.line()));
        }
        lines
            .into_iter()
            .map(|l| format!("{}: {l}", self.label))
            .collect()
    }

    /// The human summary.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let s = &self.scenario;
        let _ = writeln!(
            out,
            "herald bench: {} clients ({:?}) over {} URL(s), {} rooms × {} members, {} senders, {} msgs/s, {} B payload, {} s{}",
            s.clients,
            s.transport,
            s.urls.len(),
            s.rooms,
            s.members,
            s.senders,
            num(s.rate),
            s.payload_bytes,
            num(s.duration_s),
            if s.idle { ", idle" } else { "" }
        );
        let row = |out: &mut String, k: &str, v: String| {
            let _ = writeln!(out, "  {k:<24} {v}");
        };
        let c = &self.connect;
        let _ = writeln!(out, "connect");
        row(
            &mut out,
            "connected",
            format!("{} / {}", c.connected, c.attempted),
        );
        row(
            &mut out,
            "failed",
            format!(
                "{} connect, {} join{}",
                c.connect_failed,
                c.join_failed,
                reasons(&c.failures)
            ),
        );
        row(
            &mut out,
            "rate",
            format!("{} conn/s over {} s", num(c.rate_per_s), num(c.seconds)),
        );
        row(&mut out, "handshake", pct_line(&c.latency));
        row(
            &mut out,
            "setup (with joins)",
            format!("{} s", num(c.setup_seconds)),
        );
        if !s.idle {
            let p = &self.publish;
            let _ = writeln!(out, "publish");
            row(
                &mut out,
                "sent / acked ok",
                format!("{} / {}", p.sent, p.acked_ok),
            );
            row(
                &mut out,
                "refused / unacked",
                format!("{}{} / {}", p.ack_failed, reasons(&p.ack_errors), p.unacked),
            );
            row(&mut out, "throttled", p.throttled.to_string());
            row(
                &mut out,
                "rate",
                format!("{} msgs/s over {} s", num(p.rate_per_s), num(p.seconds)),
            );
            row(&mut out, "ack round trip", pct_line(&p.ack_latency));
            let d = &self.delivery;
            let _ = writeln!(out, "delivery");
            row(&mut out, "expected", d.tally.expected.to_string());
            row(
                &mut out,
                "received (distinct)",
                d.tally.received.to_string(),
            );
            row(&mut out, "lost", d.tally.lost.to_string());
            row(&mut out, "duplicates", d.tally.duplicates.to_string());
            row(
                &mut out,
                "unexpected / stale",
                format!("{} / {}", d.tally.unexpected, d.tally.stale),
            );
            row(
                &mut out,
                "rate",
                format!(
                    "{} msgs/s while sending ({} overall, drained in {} s)",
                    num(d.rate_per_s),
                    num(d.overall_rate_per_s),
                    num(d.drain_seconds)
                ),
            );
            let _ = writeln!(out, "latency (end to end)");
            row(&mut out, "all", pct_line(&self.latency));
            if let Some(cross) = &self.cross_instance_latency {
                row(&mut out, "cross-instance", pct_line(cross));
            }
            if let Some(own) = &self.own_message_latency {
                row(&mut out, "own messages", pct_line(own));
            }
        }
        let _ = writeln!(out, "connections");
        let disconnected: u64 = self.disconnects.values().sum();
        row(
            &mut out,
            "disconnects",
            format!("{disconnected}{}", reasons(&self.disconnects)),
        );
        row(
            &mut out,
            "unreadable frames",
            self.unreadable_frames.to_string(),
        );
        if !self.processes.is_empty() {
            let _ = writeln!(
                out,
                "processes (RSS MiB start → connected → end, max; CPU % of one core connecting / running)"
            );
            for p in &self.processes {
                let mib = |k: u64| num(k as f64 / 1024.0);
                row(
                    &mut out,
                    &format!("{} {} ({})", p.name, p.pid, p.role),
                    format!(
                        "{} → {} → {}, max {}; {}% / {}%",
                        mib(p.rss_start_kib),
                        mib(p.rss_connected_kib),
                        mib(p.rss_loaded_kib),
                        mib(p.rss_max_kib),
                        num(p.cpu_connect_pct),
                        num(p.cpu_run_pct)
                    ),
                );
            }
            if let Some(per) = self.rss_per_connection_kib {
                row(&mut out, "rss per connection", format!("{} KiB", num(per)));
            }
            let cpu = &self.cpu;
            row(
                &mut out,
                "machine busy",
                format!(
                    "{}% connecting, {}% running (of {}00%); others {}%; irq+softirq {}%",
                    num(cpu.machine_connect_pct),
                    num(cpu.machine_run_pct),
                    cpu.cores,
                    num(cpu.others_run_pct),
                    num(cpu.irq_run_pct)
                ),
            );
        }
        if !self.checks.is_empty() {
            let _ = writeln!(out, "checks");
            for check in &self.checks {
                let _ = writeln!(out, "  {}", check.line());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_compare_both_ways() {
        assert!(Check::at_most("p99", 49.0, 50.0, "ms").pass);
        assert!(!Check::at_most("p99", 50.5, 50.0, "ms").pass);
        assert!(Check::at_least("rate", 5000.0, 5000.0, "conn/s").pass);
        assert!(!Check::at_least("rate", 4999.0, 5000.0, "conn/s").pass);
        assert_eq!(
            Check::at_most("p99", 12.345, 50.0, "ms").line(),
            "p99 <= 50.0 ms: 12.3 ms PASS"
        );
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(num(0.0), "0");
        assert_eq!(num(-0.0), "0");
        assert_eq!(num(1.234), "1.23");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(251234.7), "251235");
    }
}
