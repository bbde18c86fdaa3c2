//! Test databases: a fresh SQLite file, and a fresh PostgreSQL database on `DATABASE_URL` or
//! on a private server started from the binaries on PATH.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// A URL for a new, empty SQLite database in a temporary directory.
pub fn sqlite_url() -> String {
    let dir = herald_core::testsuite::temp_dir("herald-store-", &unique());
    format!("sqlite://{}?mode=rwc", dir.join("herald.db").display())
}

fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos:x}{}", std::process::id())
}

/// The server URL (without database): `DATABASE_URL`'s, or a private server's.
fn server() -> &'static (String, String) {
    static SERVER: OnceLock<(String, String)> = OnceLock::new();
    SERVER.get_or_init(|| {
        match std::env::var("DATABASE_URL").or_else(|_| std::env::var("POSTGRES_URL")) {
            Ok(url) => {
                let (base, db) =
                    url.rsplit_once('/')
                        .map_or((url.clone(), "postgres".to_owned()), |(b, d)| {
                            (
                                b.to_owned(),
                                d.split('?').next().unwrap_or("postgres").to_owned(),
                            )
                        });
                (base, db)
            }
            Err(_) => (start_postgres(), "postgres".to_owned()),
        }
    })
}

/// Starts a private PostgreSQL (initdb into a temporary directory, trust auth, loopback) that
/// stops, and whose directory is removed, when this process exits. As root, it runs as the
/// `postgres` user.
pub fn start_postgres() -> String {
    let dir: PathBuf = herald_core::testsuite::temp_dir("herald-pg-", &unique());
    let port = herald_core::testsuite::free_port();
    let as_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let run = if as_root {
        let _ = Command::new("chown")
            .args(["-R", "postgres", &dir.display().to_string()])
            .status();
        "runuser -u postgres --"
    } else {
        ""
    };
    let data = dir.join("data");
    let (initdb, postgres) = (pg_bin("initdb"), pg_bin("postgres"));
    let script = format!(
        "{run} {initdb} -D {data} -A trust -U postgres >/dev/null 2>&1 || exit 1; \
         ({run} {postgres} -D {data} -p {port} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off & pid=$!; \
          while kill -0 {parent} 2>/dev/null; do sleep 1; done; kill $pid; wait $pid; rm -rf {dir}) \
          >/dev/null 2>&1 &",
        data = data.display(),
        dir = dir.display(),
        parent = std::process::id()
    );
    let started = Command::new("sh").arg("-c").arg(script).status();
    assert!(
        started.is_ok_and(|s| s.success()),
        "initdb and postgres must be on PATH (or set DATABASE_URL)"
    );
    herald_core::testsuite::wait_for_port(port);
    format!("postgres://postgres@127.0.0.1:{port}")
}

/// A PostgreSQL server binary: from PATH, else from Debian's `/usr/lib/postgresql/<v>/bin`.
fn pg_bin(name: &str) -> String {
    let on_path = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output();
    if on_path.is_ok_and(|o| o.status.success()) {
        return name.to_owned();
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.path().join("bin").join(name))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .map_or_else(|| name.to_owned(), |p| p.display().to_string())
}

/// How old a test database must be before a later test run drops it.
const STALE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Drops test databases that earlier runs made more than [`STALE`] ago, once per process:
/// a test cannot drop its own (the store's pool outlives it), so on a shared `DATABASE_URL`
/// server they would pile up. Their names start with the creation time (see [`unique`]). A
/// database still in use refuses, and is left for a later run.
async fn drop_stale(admin: &mut sqlx::PgConnection) {
    static SWEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if SWEPT.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'herald_test_%'")
            .fetch_all(&mut *admin)
            .await
            .unwrap_or_default();
    for name in names {
        let made = name
            .strip_prefix("herald_test_")
            .and_then(|rest| rest.get(..16))
            .and_then(|hex| u128::from_str_radix(hex, 16).ok());
        if made.is_some_and(|made| now.saturating_sub(made) > STALE.as_nanos()) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                .execute(&mut *admin)
                .await;
        }
    }
}

/// A new, empty PostgreSQL database for one test.
pub async fn postgres_url() -> String {
    use sqlx::Connection;
    let (base, admin_db) = server();
    let name = format!("herald_test_{}", unique());
    let mut admin = None;
    for _ in 0..100 {
        match sqlx::PgConnection::connect(&format!("{base}/{admin_db}")).await {
            Ok(conn) => {
                admin = Some(conn);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    let mut admin = admin.expect("postgres accepts connections within 10s");
    drop_stale(&mut admin).await;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create test database");
    format!("{base}/{name}")
}
