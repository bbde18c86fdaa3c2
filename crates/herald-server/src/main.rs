//! The `herald` binary: parses flags, loads the configuration and runs a subcommand.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use herald_server::auth;
use herald_server::config::{Config, parse_duration};

/// jemalloc rather than the system allocator: see the dependency's note in Cargo.toml.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "A real-time messaging server: Socket.IO and plain WebSocket, rooms, presence and recovery"
)]
struct Cli {
    /// TOML configuration file; its settings override the environment.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Flags that override the environment and the file.
#[derive(Args)]
struct Overrides {
    /// Port to listen on (env PORT).
    #[arg(long, global = true)]
    port: Option<String>,
    /// Address to listen on (env HERALD_HOST).
    #[arg(long, global = true)]
    host: Option<String>,
    /// Instance id (env INSTANCE_ID; default: the hostname).
    #[arg(long, global = true)]
    instance_id: Option<String>,
    /// Comma-separated Socket.IO namespaces (env HERALD_NAMESPACES).
    #[arg(long, global = true)]
    namespaces: Option<String>,
    /// on, or off for development without tokens (env HERALD_AUTH).
    #[arg(long, global = true)]
    auth: Option<String>,
}

impl Overrides {
    fn pairs(self) -> Vec<(&'static str, String)> {
        [
            ("port", self.port),
            ("host", self.host),
            ("instance_id", self.instance_id),
            ("namespaces", self.namespaces),
            ("auth", self.auth),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve clients (the default).
    Serve,
    /// Mint a development JWT signed with the configured (or generated) HS256 secret.
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        sub: String,
        /// Room patterns the token may join, comma-separated globs such as 'chat:*'.
        #[arg(long)]
        rooms: Option<String>,
        /// Lifetime, such as 30m, 1h or 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Print the effective configuration, secrets redacted, and exit. Unknown `HERALD_*`
    /// environment names are reported on stderr; `--strict` makes them an error.
    CheckConfig {
        #[arg(long)]
        strict: bool,
    },
    /// Probe a local instance: exit 0 when GET http://$HERALD_HOST:$PORT<path> answers 200
    /// (127.0.0.1 when HERALD_HOST is 0.0.0.0 or ::).
    /// For container health checks, where no curl is installed.
    Health {
        /// `/health` (liveness) or `/ready` (readiness).
        #[arg(long, default_value = "/health")]
        path: String,
    },
    /// Apply the store's migrations (SQLite, or PostgreSQL with DATABASE_URL) and exit.
    Migrate,
    /// Run a persist worker alone, on the fleet's Redis persist stream; it serves /health,
    /// /ready and /metrics on HERALD_HOST:PORT.
    Worker,
    /// Load-test running herald instances (see benches/ for ready-made scenarios).
    Bench(Box<herald_bench::BenchArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match Config::load(&env, cli.config.as_deref(), &cli.overrides.pairs()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("herald: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config),
        Command::Token { sub, rooms, ttl } => token(&config, &sub, rooms, &ttl),
        Command::Migrate => migrate(config),
        Command::Worker => worker(config),
        Command::CheckConfig { strict } => check_config(&config, &env, strict),
        Command::Health { path } => health(&config, &path),
        Command::Bench(args) => herald_bench::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(
    config: &Config,
    env: &HashMap<String, String>,
    strict: bool,
) -> anyhow::Result<()> {
    print!("{}", config.to_redacted_toml());
    let unknown = herald_server::config::unknown_env_names(env);
    for name in &unknown {
        eprintln!("herald: warning: {name} is not a herald setting (a typo?)");
    }
    if strict && !unknown.is_empty() {
        anyhow::bail!(
            "unknown settings in the environment: {}",
            unknown.join(", ")
        );
    }
    Ok(())
}

fn health(config: &Config, path: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::time::Duration;

    // An instance listening on every address answers on loopback; one bound to a single
    // address answers there only.
    let ip = if config.host.is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        config.host
    };
    let addr = SocketAddr::new(ip, config.port);
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .context("setting a read timeout")?;
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .with_context(|| format!("sending GET {path}"))?;
    let mut response = String::new();
    tcp.read_to_string(&mut response)
        .with_context(|| format!("reading the answer to GET {path}"))?;
    let status = response.lines().next().unwrap_or_default();
    anyhow::ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "GET {path}: {status}"
    );
    Ok(())
}

fn serve(config: Config) -> anyhow::Result<()> {
    herald_server::telemetry::init(config.log_format, &config.instance_id);
    let env: HashMap<String, String> = std::env::vars().collect();
    for name in herald_server::config::unknown_env_names(&env) {
        tracing::warn!(name, "not a herald setting (a typo?); ignored");
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = bind(&config).await?;
        herald_server::run(listener, config, shutdown_signal()).await
    })
}

/// The listener on `HERALD_HOST:PORT`, for `serve` and for `worker`'s endpoints, with a
/// backlog of `HERALD_LISTEN_BACKLOG` (tokio's `bind` asks for 128, which a few hundred
/// clients reconnecting at once overflow).
async fn bind(config: &Config) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = SocketAddr::new(config.host, config.port);
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .with_context(|| format!("creating a socket for {addr}"))?;
    socket
        .set_reuseaddr(true)
        .with_context(|| format!("setting SO_REUSEADDR for {addr}"))?;
    socket
        .bind(addr)
        .with_context(|| format!("binding {addr}"))?;
    socket
        .listen(config.listen_backlog)
        .with_context(|| format!("listening on {addr}"))
}

fn migrate(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(herald_server::open_store(&config))?;
    println!("migrations applied");
    Ok(())
}

fn worker(config: Config) -> anyhow::Result<()> {
    herald_server::telemetry::init(config.log_format, &config.instance_id);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = bind(&config).await?;
        herald_server::run_worker(listener, config, shutdown_signal()).await
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}

fn token(config: &Config, sub: &str, rooms: Option<String>, ttl: &str) -> anyhow::Result<()> {
    auth::check_subject(sub)?;
    let ttl = parse_duration(ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    let secret = match (&config.jwt_secret, &config.jwt_public_key) {
        (Some(secret), _) => secret.clone(),
        (None, None) => auth::dev_secret(&config.data_dir)?,
        (None, Some(_)) => anyhow::bail!(
            "JWT_SECRET is not set: this server verifies RS256/ES256 tokens, which your identity provider mints"
        ),
    };
    let rooms = rooms.map(|r| {
        r.split(',')
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect()
    });
    println!("{}", auth::mint(&secret, sub, rooms, ttl)?);
    Ok(())
}
