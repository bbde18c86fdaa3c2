//! The phases of a run: connect and join, send (or hold), drain, reconcile, report.
//!
//! At most --connect-concurrency connections are in flight; sending lasts --duration;
//! draining waits for outstanding acks and deliveries; a live progress bar runs throughout.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::{Semaphore, watch};

use crate::accounting::{acked_sets, reconcile};
use crate::args::{BenchArgs, ReportFormat};
use crate::client::{self, Clock, Ctx, Outcome, Phase, Stats, Target};
use crate::latency::{Interval, Recorder, percentiles, spectrum, to_pairs};
use crate::plan::{Plan, Shape};
use crate::procstat::{self, MachineSample, ProcSample};
use crate::report::{
    Check, ConnectReport, CpuReport, DeliveryReport, Histograms, ProcReport, PublishReport, Report,
    Scenario, SeriesPoint,
};

/// An HTTP publisher's task; it ends with (room, offset) of every message it got acked.
type ApiPublisher = tokio::task::JoinHandle<Vec<(u32, u64)>>;

/// Starts `senders` HTTP publishers for --api-batch, spread over the URLs and the rooms; they
/// wait for the sending phase.
fn api_publishers(
    args: &BenchArgs,
    ctx: &Arc<Ctx>,
    senders: usize,
    rooms: usize,
) -> anyhow::Result<Vec<ApiPublisher>> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(senders)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("HERALD_API_KEY").ok());
    let interval = Duration::from_secs_f64(args.api_batch as f64 * senders as f64 / args.rate);
    Ok((0..senders)
        .map(|i| {
            let publisher = crate::api::Publisher {
                id: args.clients + i,
                base: args.url[i % args.url.len()]
                    .trim_end_matches('/')
                    .to_owned(),
                key: key.clone(),
                batch: args.api_batch,
                interval,
                first_room: i * rooms / senders,
            };
            let (ctx, http) = (ctx.clone(), http.clone());
            tokio::spawn(async move { crate::api::run(&ctx, http, publisher).await })
        })
        .collect())
}

/// Runs `herald bench` (or merges shards' results) and prints its report; fails when a
/// check fails.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let report = if args.merge.is_empty() {
        let threads = args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let report = runtime.block_on(execute(&args, threads));
        runtime.shutdown_timeout(Duration::from_secs(1));
        report?
    } else {
        let mut report = crate::merge::merge_files(&args.merge, &args.label)?;
        report.checks = checks(&args, &report);
        report
    };
    if let Some(path) = &args.json {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        serde_json::to_writer_pretty(std::io::BufWriter::new(file), &report)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.chart {
        crate::chart::write(&report, path)?;
    }
    match args.report {
        ReportFormat::Table => print!("{}", report.table()),
        ReportFormat::Lines => {
            for line in report.figure_lines() {
                println!("{line}");
            }
        }
        ReportFormat::None => {}
    }
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| !c.pass)
        .map(|c| c.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("{} check(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

/// `http://host:port`, `ws://host:port/…` or `host:port` → `host:port`.
pub fn authority(url: &str) -> anyhow::Result<String> {
    let rest = if let Some(rest) = url.strip_prefix("http://") {
        rest
    } else if let Some(rest) = url.strip_prefix("ws://") {
        rest
    } else if url.starts_with("https://") || url.starts_with("wss://") {
        bail!("{url}: TLS is not supported by the bench; point it at the plain port");
    } else if url.contains("://") {
        bail!("{url}: use http://, ws:// or host:port");
    } else {
        url
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        bail!("{url}: no host");
    }
    let has_port = authority.rsplit_once(':').is_some_and(|(host, port)| {
        !port.is_empty() && !host.ends_with('[') && port.bytes().all(|b| b.is_ascii_digit())
    });
    Ok(if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    })
}

fn secret(args: &BenchArgs) -> anyhow::Result<Option<String>> {
    if args.no_token {
        return Ok(None);
    }
    if let Some(secret) = &args.secret {
        return Ok(Some(secret.clone()));
    }
    if let Ok(secret) = std::env::var("JWT_SECRET")
        && !secret.is_empty()
    {
        return Ok(Some(secret));
    }
    let dir = std::env::var("HERALD_DATA_DIR").unwrap_or_else(|_| "./data".to_owned());
    let path = PathBuf::from(dir).join("jwt-secret");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(Some(text.trim().to_owned())),
        _ => bail!(
            "no JWT secret: pass --secret, set JWT_SECRET, keep the development secret in {}, or use --no-token against HERALD_AUTH=off",
            path.display()
        ),
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
}

/// Tokens for the clients in `mine` (empty strings for the others).
fn mint_tokens(
    secret: &str,
    prefix: &str,
    mine: Range<usize>,
    ttl: Duration,
) -> anyhow::Result<Vec<String>> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    (0..mine.end)
        .map(|i| {
            if !mine.contains(&i) {
                return Ok(String::new());
            }
            let sub = format!("{prefix}u{i}");
            let claims = Claims {
                sub: &sub,
                exp: now + ttl.as_secs(),
                iat: now,
            };
            jsonwebtoken::encode(&header, &claims, &key).context("minting a token")
        })
        .collect()
}

/// `K/N` → (K, N).
pub fn parse_shard(shard: &str) -> anyhow::Result<(usize, usize)> {
    let parsed = shard
        .split_once('/')
        .and_then(|(k, n)| Some((k.trim().parse().ok()?, n.trim().parse().ok()?)));
    match parsed {
        Some((k, n)) if n >= 1 && k < n => Ok((k, n)),
        _ => bail!("--shard {shard}: expected K/N with 0 <= K < N"),
    }
}

/// Client indices of shard `k` of `n`.
pub fn shard_range(clients: usize, k: usize, n: usize) -> Range<usize> {
    clients * k / n..clients * (k + 1) / n
}

/// Waits until `shards` processes have reached the barrier `name` in `dir`.
async fn barrier(
    dir: &Path,
    name: &str,
    shard: usize,
    shards: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join(format!("{name}.{shard}")), b"")
        .with_context(|| format!("writing to {}", dir.display()))?;
    let started = Instant::now();
    let prefix = format!("{name}.");
    loop {
        let reached = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|f| f.starts_with(&prefix))
            })
            .count();
        if reached >= shards {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("barrier {name}: {reached} of {shards} shards after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A short random tag for room and user names, so runs never share rooms.
fn run_tag() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    format!("{:06x}", hasher.finish() & 0xff_ffff)
}

/// Samples of every watched process, and the machine.
#[derive(Clone)]
struct Snapshot {
    at: Instant,
    procs: Vec<Option<ProcSample>>,
    machine: MachineSample,
}

struct Watched {
    targets: Vec<(procstat::Target, &'static str)>,
    names: Vec<String>,
    rss_max: Vec<u64>,
}

impl Watched {
    fn new(args: &BenchArgs) -> Self {
        let mut targets: Vec<(procstat::Target, &'static str)> = Vec::new();
        targets.extend(
            args.pid
                .iter()
                .map(|p| (procstat::Target::Pid(*p), "server")),
        );
        targets.extend(
            args.aux_pid
                .iter()
                .map(|p| (procstat::Target::Pid(*p), "aux")),
        );
        targets.push((procstat::Target::Myself, "generator"));
        let names = targets.iter().map(|(t, _)| procstat::name(*t)).collect();
        let rss_max = vec![0; targets.len()];
        Self {
            targets,
            names,
            rss_max,
        }
    }

    fn snapshot(&mut self) -> Snapshot {
        let procs: Vec<Option<ProcSample>> = self
            .targets
            .iter()
            .map(|(t, _)| procstat::sample(*t).ok())
            .collect();
        for (max, sample) in self.rss_max.iter_mut().zip(&procs) {
            if let Some(s) = sample {
                *max = (*max).max(s.rss_kib);
            }
        }
        Snapshot {
            at: Instant::now(),
            procs,
            machine: procstat::machine().unwrap_or_default(),
        }
    }

    fn servers_rss(&self, snap: &Snapshot) -> u64 {
        self.targets
            .iter()
            .zip(&snap.procs)
            .filter(|((_, role), _)| *role == "server")
            .filter_map(|(_, s)| s.map(|s| s.rss_kib))
            .sum()
    }

    /// CPU % of one core between two snapshots, summed over processes of `role`.
    fn cpu(&self, role: &str, a: &Snapshot, b: &Snapshot) -> f64 {
        let secs = b.at.duration_since(a.at).as_secs_f64();
        self.targets
            .iter()
            .enumerate()
            .filter(|(_, (_, r))| *r == role)
            .filter_map(|(i, _)| match (a.procs[i], b.procs[i]) {
                (Some(x), Some(y)) => Some(procstat::cpu_percent(x.cpu_ticks, y.cpu_ticks, secs)),
                _ => None,
            })
            .sum()
    }
}

fn machine_pct(a: &Snapshot, b: &Snapshot) -> f64 {
    procstat::cpu_percent(
        a.machine.busy,
        b.machine.busy,
        b.at.duration_since(a.at).as_secs_f64(),
    )
}

fn progress(args: &BenchArgs, len: u64, template: &str) -> ProgressBar {
    if args.quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn disconnects(stats: &Stats) -> u64 {
    stats.disconnected.load(Ordering::Relaxed)
}

async fn execute(args: &BenchArgs, threads: usize) -> anyhow::Result<Report> {
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let idle = args.idle;
    let rooms = args.rooms;
    let members = args
        .members
        .unwrap_or_else(|| args.clients.checked_div(rooms).map_or(0, |m| m.max(1)));
    let senders = if idle {
        0
    } else {
        args.senders.unwrap_or(rooms)
    };
    if senders > 0 && !(args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a positive number of messages per second");
    }
    // With --api-batch the senders are HTTP publishers and the clients only receive.
    let api = args.api_batch > 0 && senders > 0;
    if api && args.count.is_some() {
        bail!("--count applies to socket senders, not to --api-batch publishers");
    }
    let tag = run_tag();
    let prefix = args
        .room_prefix
        .clone()
        .unwrap_or_else(|| format!("bench-{tag}-"));
    let plan = Plan::new(
        Shape {
            clients: args.clients,
            rooms,
            members,
            senders: if api { 0 } else { senders },
            urls: args.url.len(),
        },
        &prefix,
    )?;
    let (shard, shards) = match &args.shard {
        Some(s) => parse_shard(s)?,
        None => (0, 1),
    };
    let mine = shard_range(args.clients, shard, shards);
    for (room, members) in plan.members.iter().enumerate() {
        let inside = members.iter().filter(|c| mine.contains(c)).count();
        if inside != 0 && inside != members.len() {
            bail!(
                "--shard {shard}/{shards}: room {room}'s members fall in several shards; make clients = rooms × members with rooms divisible by {shards}"
            );
        }
    }
    let sending_slots: u64 = mine
        .clone()
        .map(|c| plan.client_sends[c].len() as u64)
        .sum();
    let mut targets = Vec::new();
    for url in &args.url {
        let authority = authority(url)?;
        let addr = tokio::net::lookup_host(&authority)
            .await
            .with_context(|| format!("resolving {authority}"))?
            .next()
            .with_context(|| format!("{authority} resolves to no address"))?;
        targets.push(Target { addr, authority });
    }
    let tokens = match secret(args)? {
        Some(secret) => mint_tokens(
            &secret,
            &format!("bench-{tag}-"),
            mine.clone(),
            args.duration + Duration::from_secs(3600),
        )?,
        None => Vec::new(),
    };
    let room_json = plan
        .room_names
        .iter()
        .map(|n| serde_json::to_string(n).unwrap_or_default())
        .collect();
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let ctx = Arc::new(Ctx {
        room_joined: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
        plan,
        transport: args.transport,
        targets,
        binds: args.bind.clone(),
        headers: args.headers.clone(),
        tokens,
        token_in: args.token_in,
        room_json,
        pad: crate::proto::pad_for(args.payload),
        send_interval: (senders > 0).then(|| Duration::from_secs_f64(senders as f64 / args.rate)),
        count: args.count,
        max_inflight: args.max_inflight.max(1),
        connect_timeout: args.connect_timeout,
        join_timeout: args.join_timeout,
        connect_gate: Semaphore::new(args.connect_concurrency.max(1)),
        stats: Stats::new(),
        recorder: Recorder::new(64),
        phase: phase_rx,
        clock: Clock::new(),
    });
    let stats = &ctx.stats;
    let mut watched = Watched::new(args);
    let publishers = if api {
        api_publishers(args, &ctx, senders, rooms)?
    } else {
        Vec::new()
    };

    // Connect and join.
    let start = watched.snapshot();
    let handles: Vec<tokio::task::JoinHandle<Outcome>> = mine
        .clone()
        .map(|i| {
            let ctx = ctx.clone();
            tokio::spawn(async move { client::run(&ctx, i).await })
        })
        .collect();
    let clients = mine.len() as u64;
    let bar = progress(
        args,
        clients,
        "{spinner} connecting [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
    );
    loop {
        let ok = stats.joined.load(Ordering::Relaxed);
        let failed = stats.connect_failed.load(Ordering::Relaxed)
            + stats.join_failed.load(Ordering::Relaxed);
        let connected = stats.connected.load(Ordering::Relaxed);
        let secs = start.at.elapsed().as_secs_f64().max(0.001);
        bar.set_position(ok + failed);
        bar.set_message(format!(
            "connected {connected}, failed {failed}, {:.0} conn/s",
            connected as f64 / secs
        ));
        if ok + failed >= clients {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();
    let connected_snap = watched.snapshot();
    let setup_seconds = connected_snap.at.duration_since(start.at).as_secs_f64();
    if let Some(dir) = &args.barrier {
        barrier(dir, "connected", shard, shards, Duration::from_secs(600)).await?;
    }

    // Send (or hold).
    let mut total = Interval::default();
    let mut scratch = Interval::default();
    ctx.recorder.drain(&mut total);
    let run_snap = watched.snapshot();
    let run_start = Instant::now();
    let run_bar = progress(
        args,
        args.duration.as_secs().max(1),
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} s {msg}",
    );
    let mut series: Vec<SeriesPoint> = Vec::new();
    let mut last_tick = run_start;
    let mut last_acked = 0u64;
    let mut record_tick = |watched: &mut Watched,
                           total: &mut Interval,
                           scratch: &mut Interval,
                           series: &mut Vec<SeriesPoint>,
                           bar: &ProgressBar,
                           label: &str| {
        let now = Instant::now();
        let secs = now.duration_since(last_tick).as_secs_f64().max(0.001);
        last_tick = now;
        ctx.recorder.drain(scratch);
        let acked = stats.acked_ok.load(Ordering::Relaxed);
        let p = percentiles(&scratch.all);
        let snap = watched.snapshot();
        let point = SeriesPoint {
            t_s: now.duration_since(run_start).as_secs_f64(),
            delivered_per_s: scratch.delivered as f64 / secs,
            published_per_s: (acked - last_acked) as f64 / secs,
            p50_ms: p.p50_ms,
            p90_ms: p.p90_ms,
            p99_ms: p.p99_ms,
            max_ms: p.max_ms,
            servers_rss_kib: watched.servers_rss(&snap),
        };
        last_acked = acked;
        bar.set_position(now.duration_since(run_start).as_secs());
        bar.set_message(format!(
            "{label} · pub {:.0}/s · deliv {:.0}/s · p99 {:.1} ms · disconnects {}",
            point.published_per_s,
            point.delivered_per_s,
            point.p99_ms,
            disconnects(stats)
        ));
        series.push(point);
        total.absorb(scratch);
    };
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let (send_seconds, delivered_in_window, drain_seconds);
    if idle || (senders == 0 && !api) {
        while run_start.elapsed() < args.duration {
            ticker.tick().await;
            record_tick(
                &mut watched,
                &mut total,
                &mut scratch,
                &mut series,
                &run_bar,
                "holding",
            );
        }
        send_seconds = run_start.elapsed().as_secs_f64();
        delivered_in_window = total.delivered;
        drain_seconds = 0.0;
    } else {
        let _ = phase_tx.send(Phase::Run);
        let done_sending =
            || args.count.is_some() && stats.senders_done.load(Ordering::Relaxed) >= sending_slots;
        while run_start.elapsed() < args.duration && !done_sending() {
            tokio::select! {
                _ = ticker.tick() => {
                    record_tick(&mut watched, &mut total, &mut scratch, &mut series, &run_bar, "sending");
                }
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let _ = phase_tx.send(Phase::Stop);
        let stop = Instant::now();
        send_seconds = stop.duration_since(run_start).as_secs_f64();
        ctx.recorder.drain(&mut scratch);
        delivered_in_window = total.delivered + scratch.delivered;
        // Drain: wait for outstanding acks and deliveries.
        loop {
            let sent = stats.sent.load(Ordering::Relaxed);
            let answered =
                stats.acked_ok.load(Ordering::Relaxed) + stats.ack_failed.load(Ordering::Relaxed);
            let expected = stats.expected.load(Ordering::Relaxed);
            let delivered = total.delivered + scratch.delivered;
            if (answered >= sent && delivered >= expected) || stop.elapsed() >= args.drain {
                break;
            }
            tokio::select! {
                _ = ticker.tick() => {
                    record_tick(&mut watched, &mut total, &mut scratch, &mut series, &run_bar, "draining");
                }
                () = tokio::time::sleep(Duration::from_millis(20)) => {
                    ctx.recorder.drain(&mut scratch);
                }
            }
        }
        drain_seconds = stop.elapsed().as_secs_f64();
        if !scratch.all.is_empty() || scratch.delivered > 0 {
            record_tick(
                &mut watched,
                &mut total,
                &mut scratch,
                &mut series,
                &run_bar,
                "drained",
            );
        }
    }
    run_bar.finish_and_clear();
    let loaded = watched.snapshot();
    let run_seconds = loaded.at.duration_since(run_snap.at).as_secs_f64();

    // Close and collect.
    if let Some(dir) = &args.barrier {
        barrier(dir, "done", shard, shards, Duration::from_secs(300)).await?;
    }
    let _ = phase_tx.send(Phase::Done);
    let mut outcomes = Vec::with_capacity(handles.len());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for handle in handles {
        match tokio::time::timeout_at(deadline, handle).await {
            Ok(Ok(outcome)) => outcomes.push(outcome),
            Ok(Err(e)) => bail!("a client task failed: {e}"),
            Err(_) => bail!("clients did not finish within 10 s of the end of the run"),
        }
    }
    ctx.recorder.drain(&mut total);

    let mut api_acked = Vec::new();
    for publisher in publishers {
        match tokio::time::timeout_at(deadline, publisher).await {
            Ok(Ok(acked)) => api_acked.extend(acked),
            Ok(Err(e)) => bail!("an API publisher failed: {e}"),
            Err(_) => bail!("API publishers did not finish within 10 s of the end of the run"),
        }
    }
    let acked = acked_sets(
        rooms,
        outcomes
            .iter()
            .flat_map(|o| o.acked.iter().copied())
            .chain(api_acked),
    );
    let tally = reconcile(&acked, outcomes.iter().map(|o| &o.ledger));
    let unacked: u64 = outcomes.iter().map(|o| o.unacked).sum();

    let connected = stats.connected.load(Ordering::Relaxed);
    let first = stats.first_connect_us.load(Ordering::Relaxed);
    let last = stats.last_connect_us.load(Ordering::Relaxed);
    let connect_seconds = if connected > 0 && last > first {
        (last - first) as f64 / 1e6
    } else {
        0.0
    };
    let (connect_latency, connect_pairs) = stats
        .connect_latency
        .lock()
        .ok()
        .and_then(|h| h.as_ref().map(|h| (percentiles(h), to_pairs(h))))
        .unwrap_or_default();
    let cross = (args.url.len() > 1 && !idle).then(|| percentiles(&total.cross));
    let own = (!idle && senders > 0 && !api).then(|| percentiles(&total.own));

    let processes: Vec<ProcReport> = watched
        .targets
        .iter()
        .enumerate()
        .map(|(i, (target, role))| {
            let rss = |s: &Snapshot| s.procs[i].map_or(0, |p| p.rss_kib);
            let cpu = |a: &Snapshot, b: &Snapshot| match (a.procs[i], b.procs[i]) {
                (Some(x), Some(y)) => procstat::cpu_percent(
                    x.cpu_ticks,
                    y.cpu_ticks,
                    b.at.duration_since(a.at).as_secs_f64(),
                ),
                _ => 0.0,
            };
            ProcReport {
                pid: match target {
                    procstat::Target::Pid(p) => *p,
                    procstat::Target::Myself => std::process::id(),
                },
                name: watched.names[i].clone(),
                role: (*role).to_owned(),
                rss_start_kib: rss(&start),
                rss_connected_kib: rss(&connected_snap),
                rss_loaded_kib: rss(&loaded),
                rss_max_kib: watched.rss_max[i],
                cpu_connect_pct: cpu(&start, &connected_snap),
                cpu_run_pct: cpu(&run_snap, &loaded),
            }
        })
        .collect();
    let servers_start: u64 = processes
        .iter()
        .filter(|p| p.role == "server")
        .map(|p| p.rss_start_kib)
        .sum();
    let servers_loaded: u64 = processes
        .iter()
        .filter(|p| p.role == "server")
        .map(|p| p.rss_loaded_kib)
        .sum();
    let rss_per_connection_kib = (!args.pid.is_empty() && connected > 0)
        .then(|| (servers_loaded as f64 - servers_start as f64) / connected as f64);
    let mut cpu = CpuReport {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        connect_seconds: connected_snap.at.duration_since(start.at).as_secs_f64(),
        run_seconds,
        servers_connect_pct: watched.cpu("server", &start, &connected_snap),
        servers_run_pct: watched.cpu("server", &run_snap, &loaded),
        aux_run_pct: watched.cpu("aux", &run_snap, &loaded),
        generator_connect_pct: watched.cpu("generator", &start, &connected_snap),
        generator_run_pct: watched.cpu("generator", &run_snap, &loaded),
        machine_connect_pct: machine_pct(&start, &connected_snap),
        machine_run_pct: machine_pct(&run_snap, &loaded),
        irq_run_pct: procstat::cpu_percent(run_snap.machine.irq, loaded.machine.irq, run_seconds),
        others_run_pct: 0.0,
    };
    cpu.others_run_pct =
        (cpu.machine_run_pct - cpu.servers_run_pct - cpu.aux_run_pct - cpu.generator_run_pct)
            .max(0.0);

    let acked_ok = stats.acked_ok.load(Ordering::Relaxed);
    let latency = percentiles(&total.all);
    let delivery_rate = if send_seconds > 0.0 {
        delivered_in_window as f64 / send_seconds
    } else {
        0.0
    };
    let whole = send_seconds + drain_seconds;
    let mut report = Report {
        label: args.label.clone(),
        scenario: Scenario {
            transport: args.transport,
            urls: args.url.clone(),
            clients: args.clients,
            rooms,
            members,
            senders,
            rate: if senders > 0 { args.rate } else { 0.0 },
            count: args.count,
            payload_bytes: args.payload,
            duration_s: args.duration.as_secs_f64(),
            idle: idle || senders == 0,
            connect_concurrency: args.connect_concurrency,
            threads,
            bind: args.bind.iter().map(ToString::to_string).collect(),
        },
        connect: ConnectReport {
            attempted: clients,
            connected,
            connect_failed: stats.connect_failed.load(Ordering::Relaxed),
            join_failed: stats.join_failed.load(Ordering::Relaxed),
            failures: Stats::snapshot(&stats.failures),
            seconds: connect_seconds,
            rate_per_s: if connect_seconds > 0.0 {
                connected as f64 / connect_seconds
            } else {
                0.0
            },
            latency: connect_latency,
            setup_seconds,
            first_attempt_unix_us: ctx.clock.unix_us(if connected > 0 { first } else { 0 }),
            last_connected_unix_us: ctx.clock.unix_us(last),
        },
        publish: PublishReport {
            sent: stats.sent.load(Ordering::Relaxed),
            acked_ok,
            ack_failed: stats.ack_failed.load(Ordering::Relaxed),
            ack_errors: Stats::snapshot(&stats.ack_errors),
            unacked,
            throttled: stats.throttled.load(Ordering::Relaxed),
            seconds: send_seconds,
            rate_per_s: if send_seconds > 0.0 {
                acked_ok as f64 / send_seconds
            } else {
                0.0
            },
            ack_latency: percentiles(&total.ack),
        },
        delivery: DeliveryReport {
            tally,
            rate_per_s: delivery_rate,
            overall_rate_per_s: if whole > 0.0 {
                tally.received as f64 / whole
            } else {
                0.0
            },
            drain_seconds,
        },
        latency,
        cross_instance_latency: cross,
        own_message_latency: own,
        spectrum: spectrum(&total.all),
        disconnects: Stats::snapshot(&stats.disconnects),
        unreadable_frames: stats.unreadable.load(Ordering::Relaxed),
        processes,
        rss_per_connection_kib,
        cpu,
        series,
        checks: Vec::new(),
        histograms: Histograms {
            all: to_pairs(&total.all),
            cross: to_pairs(&total.cross),
            own: to_pairs(&total.own),
            ack: to_pairs(&total.ack),
            connect: connect_pairs,
        },
    };
    report.checks = checks(args, &report);
    Ok(report)
}

fn checks(args: &BenchArgs, r: &Report) -> Vec<Check> {
    let mut checks = Vec::new();
    if args.strict {
        let c = &r.connect;
        checks.push(Check::at_most(
            "connect failures",
            c.connect_failed as f64,
            0.0,
            "",
        ));
        checks.push(Check::at_most(
            "join failures",
            c.join_failed as f64,
            0.0,
            "",
        ));
        checks.push(Check::at_most(
            "disconnects",
            r.disconnects.values().sum::<u64>() as f64,
            0.0,
            "",
        ));
        if !r.scenario.idle {
            checks.push(Check::at_least(
                "messages acked ok",
                r.publish.acked_ok as f64,
                1.0,
                "",
            ));
            checks.push(Check::at_most(
                "publishes refused or unacked",
                (r.publish.ack_failed + r.publish.unacked) as f64,
                0.0,
                "",
            ));
            checks.push(Check::at_most(
                "lost deliveries",
                r.delivery.tally.lost as f64,
                0.0,
                "",
            ));
            checks.push(Check::at_most(
                "duplicate deliveries",
                r.delivery.tally.duplicates as f64,
                0.0,
                "",
            ));
        }
    }
    if let Some(min) = args.min_delivery_rate {
        checks.push(Check::at_least(
            "deliveries/s",
            r.delivery.rate_per_s,
            min,
            "msgs/s",
        ));
    }
    if let Some(max) = args.max_p99 {
        let value = if r.latency.count > 0 {
            r.latency.p99_ms
        } else {
            f64::INFINITY
        };
        checks.push(Check::at_most("p99", value, max.as_secs_f64() * 1e3, "ms"));
    }
    if let Some(max) = args.max_cross_p99 {
        let value = r
            .cross_instance_latency
            .filter(|p| p.count > 0)
            .map_or(f64::INFINITY, |p| p.p99_ms);
        checks.push(Check::at_most(
            "cross-instance p99",
            value,
            max.as_secs_f64() * 1e3,
            "ms",
        ));
    }
    if let Some(min) = args.min_connect_rate {
        checks.push(Check::at_least(
            "connect rate",
            r.connect.rate_per_s,
            min,
            "conn/s",
        ));
    }
    if let Some(max) = args.max_rss_per_conn_kib {
        checks.push(Check::at_most(
            "rss per connection",
            r.rss_per_connection_kib.unwrap_or(f64::INFINITY),
            max,
            "KiB",
        ));
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_become_authorities() {
        assert_eq!(
            authority("http://127.0.0.1:3001").expect("ok"),
            "127.0.0.1:3001"
        );
        assert_eq!(authority("ws://localhost:9/ws").expect("ok"), "localhost:9");
        assert_eq!(authority("localhost").expect("ok"), "localhost:80");
        assert_eq!(authority("[::1]:3000").expect("ok"), "[::1]:3000");
        assert!(authority("https://x:1").is_err());
        assert!(authority("http://").is_err());
    }

    #[test]
    fn tokens_are_minted_per_client() {
        let tokens = mint_tokens("secret-123456", "bench-x-", 1..4, Duration::from_secs(60))
            .expect("tokens");
        assert_eq!(tokens.len(), 4);
        assert!(tokens[0].is_empty());
        assert_ne!(tokens[1], tokens[2]);
        assert_eq!(tokens[1].split('.').count(), 3);
    }

    #[test]
    fn shards_split_the_clients() {
        assert_eq!(parse_shard("1/2").expect("ok"), (1, 2));
        assert!(parse_shard("2/2").is_err());
        assert!(parse_shard("x").is_err());
        assert_eq!(shard_range(20_000, 0, 2), 0..10_000);
        assert_eq!(shard_range(20_000, 1, 2), 10_000..20_000);
        assert_eq!(shard_range(10, 2, 3), 6..10);
    }
}
