//! The flags of `herald bench`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tokio_tungstenite::tungstenite;

/// Which front door the clients use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Socket.IO (Engine.IO v4 over WebSocket) at /socket.io/.
    Sio,
    /// herald's plain JSON WebSocket at /ws.
    Ws,
}

/// Where a Socket.IO client puts its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenIn {
    /// The CONNECT packet's auth payload, as socket.io-client's `auth: {token}` does.
    Auth,
    /// The handshake URL's `?token=`.
    Query,
}

/// How the result is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// A summary table, then one line per check.
    Table,
    /// Only one line per figure and one line per check, each starting with the label.
    Lines,
    /// Nothing (with --json, for a shard whose results are merged later).
    None,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// A request header as `name: value`.
pub type Header = (
    tungstenite::http::HeaderName,
    tungstenite::http::HeaderValue,
);

fn header(s: &str) -> Result<Header, String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not `name: value`"))?;
    let name = tungstenite::http::HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|e| format!("header name {:?}: {e}", name.trim()))?;
    let value = tungstenite::http::HeaderValue::from_str(value.trim())
        .map_err(|e| format!("header value for {name}: {e}"))?;
    Ok((name, value))
}

/// Load-test herald: N clients over one or more instances, rooms, senders at a total rate;
/// reports connect rate and failures, end-to-end latency, loss and duplicates, delivered
/// messages per second and, with --pid, the servers' RSS and CPU. A flag given twice takes
/// its last value.
#[derive(Debug, Clone, Args)]
#[command(args_override_self = true, next_help_heading = "Bench options")]
pub struct BenchArgs {
    /// Instances to connect to, comma-separated (http://, ws:// or host:port); clients are
    /// spread over them round robin.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:3000")]
    pub url: Vec<String>,
    /// Socket.IO or plain /ws clients.
    #[arg(long, value_enum, default_value = "sio")]
    pub transport: Transport,
    /// Number of clients (connections).
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Number of rooms; 0 for connections only.
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// Members per room (default: clients / rooms). A client joins several rooms when
    /// rooms × members exceeds the clients.
    #[arg(long)]
    pub members: Option<usize>,
    /// Number of publishing memberships, spread evenly over the rooms (default: one per room).
    #[arg(long)]
    pub senders: Option<usize>,
    /// Total messages per second over all senders.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Stop each sender after this many messages (default: send for the whole duration).
    #[arg(long)]
    pub count: Option<u64>,
    /// Approximate size in bytes of each message's `data` JSON.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// How long to send (or, with --idle, to hold the connections).
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub duration: Duration,
    /// Connect (and join), hold for --duration, send nothing.
    #[arg(long)]
    pub idle: bool,
    /// After sending stops, how long to wait at most for outstanding acks and deliveries.
    #[arg(long, value_parser = duration, default_value = "5s")]
    pub drain: Duration,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 100)]
    pub connect_concurrency: usize,
    /// Give up on a connection (TCP, upgrade, Socket.IO connect) after this long.
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub connect_timeout: Duration,
    /// Give up on a join ack after this long.
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub join_timeout: Duration,
    /// Source addresses to connect from, comma-separated, round robin (such as
    /// 127.0.0.2,127.0.0.3), so a run is not capped by one address's ephemeral ports.
    #[arg(long, value_delimiter = ',')]
    pub bind: Vec<IpAddr>,
    /// A header every client's websocket handshake carries, as `name: value`; repeat the
    /// flag for more (to measure what a browser's handshake costs the server, say).
    #[arg(long = "header", value_parser = header)]
    pub headers: Vec<Header>,
    /// HS256 secret to mint tokens with (default: env JWT_SECRET, then
    /// $HERALD_DATA_DIR/jwt-secret or ./data/jwt-secret).
    #[arg(long)]
    pub secret: Option<String>,
    /// Connect without tokens (for servers run with HERALD_AUTH=off).
    #[arg(long)]
    pub no_token: bool,
    /// Where Socket.IO clients put their token.
    #[arg(long, value_enum, default_value = "auth")]
    pub token_in: TokenIn,
    /// Publish through `POST /api/publish` in batches of this many messages instead of over
    /// the clients' sockets: --senders HTTP publishers share --rate, and the clients only
    /// receive. 0 (the default) publishes over the sockets.
    #[arg(long, default_value_t = 0)]
    pub api_batch: usize,
    /// The API key for --api-batch (default: env HERALD_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Publishes awaiting their ack per sender before further sends are skipped.
    #[arg(long, default_value_t = 1000)]
    pub max_inflight: usize,
    /// Room names are this prefix and the room's number (default: `bench-<random>-`).
    #[arg(long)]
    pub room_prefix: Option<String>,
    /// Worker threads of the generator (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Server process ids, comma-separated: their RSS and CPU are reported, and their RSS
    /// growth divided by the connections gives the RSS per connection.
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// Other process ids (such as redis-server) whose RSS and CPU are reported apart.
    #[arg(long, value_delimiter = ',')]
    pub aux_pid: Vec<u32>,
    /// Write the full result as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write an SVG chart (latency over time, deliveries per second, percentiles).
    #[arg(long, value_name = "FILE.svg")]
    pub chart: Option<PathBuf>,
    /// How the result is printed on stdout.
    #[arg(long, value_enum, default_value = "table")]
    pub report: ReportFormat,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Run only shard K of N (such as 0/2): the clients in the K-th of N equal index ranges,
    /// so that N generator processes share one scenario (a process has one open-files limit).
    /// Every room's members must fall in one shard. Use the same --room-prefix everywhere and
    /// combine the JSON results with --merge.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<String>,
    /// A directory the shards of one run share: each waits there until all have connected
    /// before sending, and until all have finished before closing.
    #[arg(long, value_name = "DIR")]
    pub barrier: Option<PathBuf>,
    /// Run nothing: merge these JSON results of shards (comma-separated) into one report,
    /// then print and check it.
    #[arg(long, value_delimiter = ',', value_name = "FILES")]
    pub merge: Vec<PathBuf>,
    /// Name printed at the start of every figure and check line.
    #[arg(long, default_value = "bench")]
    pub label: String,

    /// Fail (exit 1) on any connect failure, loss, duplicate or unexpected disconnect.
    #[arg(long)]
    pub strict: bool,
    /// Fail unless delivered messages per second reach this.
    #[arg(long)]
    pub min_delivery_rate: Option<f64>,
    /// Fail unless the end-to-end p99 is at most this (such as 50ms).
    #[arg(long, value_parser = duration)]
    pub max_p99: Option<Duration>,
    /// Fail unless the p99 of deliveries across instances is at most this.
    #[arg(long, value_parser = duration)]
    pub max_cross_p99: Option<Duration>,
    /// Fail unless connections per second reach this.
    #[arg(long)]
    pub min_connect_rate: Option<f64>,
    /// Fail unless the servers' RSS growth per connection is at most this many KiB.
    #[arg(long)]
    pub max_rss_per_conn_kib: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::header;

    #[test]
    fn headers_are_read_as_name_and_value() {
        let (name, value) = header("Accept-Language:  en-GB,en;q=0.9 ").expect("a header");
        assert_eq!(name.as_str(), "accept-language");
        assert_eq!(value, "en-GB,en;q=0.9");
        let (name, value) = header("cookie: a=b; c=d:e").expect("a colon in the value");
        assert_eq!(
            (name.as_str(), value.to_str().ok()),
            ("cookie", Some("a=b; c=d:e"))
        );
    }

    #[test]
    fn a_malformed_header_says_what_is_wrong() {
        let missing = header("no colon").expect_err("no separator");
        assert!(missing.contains("is not `name: value`"), "{missing}");
        let bad = header("bad name: x").expect_err("a space in the name");
        assert!(bad.contains("header name"), "{bad}");
    }
}
