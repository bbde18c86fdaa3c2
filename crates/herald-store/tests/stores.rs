//! The shared Store suite against real SQLite and real PostgreSQL.

use std::sync::Arc;

use herald_core::Store;
use herald_store::{PostgresStore, SqliteStore, testing};

mod sqlite {
    use super::*;

    herald_core::store_test_suite!(|| async {
        Arc::new(
            SqliteStore::connect(&testing::sqlite_url())
                .await
                .expect("sqlite"),
        ) as Arc<dyn Store>
    });
}

mod postgres {
    use super::*;

    herald_core::store_test_suite!(|| async {
        let url = testing::postgres_url().await;
        Arc::new(PostgresStore::connect(&url).await.expect("postgres")) as Arc<dyn Store>
    });
}

/// A database that has only the first migration, with a row in it, as a herald from before
/// epochs left it.
const BEFORE_EPOCHS: &str = r#"INSERT INTO messages (id, namespace, room, "offset", sender, payload, created_at)
VALUES ('old-1', '/', 'kept', 1, 'alice', '{"n":1}', "#;

fn kept() -> herald_core::RoomKey {
    herald_core::RoomKey::new(
        herald_core::Namespace::root(),
        herald_core::RoomName::new("kept").expect("room"),
    )
}

async fn rows_of_the_empty_epoch(store: &dyn Store) -> Vec<(u64, String)> {
    let all = herald_core::HistoryQuery {
        since: Some(0),
        before: None,
        limit: 10,
    };
    store
        .history(&kept(), "", all)
        .await
        .expect("history")
        .iter()
        .map(|m| (m.offset, m.id.clone()))
        .collect()
}

#[tokio::test]
async fn sqlite_migration_keeps_rows_stored_before_epochs() {
    use sqlx::Connection;
    let url = testing::sqlite_url();
    let mut conn = sqlx::SqliteConnection::connect(&url).await.expect("sqlite");
    sqlx::raw_sql(include_str!("../migrations/sqlite/0001_messages.sql"))
        .execute(&mut conn)
        .await
        .expect("first migration");
    sqlx::raw_sql(&format!("{BEFORE_EPOCHS}1700000000000)"))
        .execute(&mut conn)
        .await
        .expect("old row");
    conn.close().await.expect("close");
    let store = SqliteStore::connect(&url).await.expect("migrates");
    assert_eq!(
        rows_of_the_empty_epoch(&store).await,
        vec![(1, "old-1".to_owned())]
    );
}

#[tokio::test]
async fn postgres_migration_keeps_rows_stored_before_epochs() {
    use sqlx::Connection;
    let url = testing::postgres_url().await;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("postgres");
    sqlx::raw_sql(include_str!("../migrations/postgres/0001_messages.sql"))
        .execute(&mut conn)
        .await
        .expect("first migration");
    sqlx::raw_sql(&format!("{BEFORE_EPOCHS}now())"))
        .execute(&mut conn)
        .await
        .expect("old row");
    conn.close().await.expect("close");
    let store = PostgresStore::connect(&url).await.expect("migrates");
    assert_eq!(
        rows_of_the_empty_epoch(&store).await,
        vec![(1, "old-1".to_owned())]
    );
}

#[tokio::test]
async fn postgres_retention_by_time_is_served_by_the_created_at_index() {
    use sqlx::Connection;
    let url = testing::postgres_url().await;
    drop(PostgresStore::connect(&url).await.expect("migrates"));
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("postgres");
    // The test table is small; without this the planner would read it whole either way.
    sqlx::raw_sql("SET enable_seqscan = off")
        .execute(&mut conn)
        .await
        .expect("set");
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN DELETE FROM messages WHERE created_at < now() - interval '30 days'",
    )
    .fetch_all(&mut conn)
    .await
    .expect("explain");
    let plan = plan.join("\n");
    assert!(
        plan.contains("Bitmap Index Scan on messages_created_at"),
        "a retention delete should use the created_at index:\n{plan}"
    );
    let method: String = sqlx::query_scalar(
        "SELECT am.amname::text FROM pg_class c JOIN pg_am am ON am.oid = c.relam WHERE c.relname = 'messages_created_at'",
    )
    .fetch_one(&mut conn)
    .await
    .expect("index");
    assert_eq!(method, "brin", "the time index costs little per insert");
}

/// A PostgreSQL store that counts the writes in flight, to see the worker's parallelism.
struct Watched {
    inner: PostgresStore,
    in_flight: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
    written: std::sync::atomic::AtomicU64,
}

impl Store for Watched {
    fn write(
        &self,
        batch: &[Arc<herald_core::Message>],
    ) -> herald_core::BoxFuture<'_, Result<u64, herald_core::StoreError>> {
        use std::sync::atomic::Ordering;
        let batch = batch.to_vec();
        Box::pin(async move {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            // Long enough that the next batches are read while this one is written.
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            let written = self.inner.write(&batch).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if let Ok(n) = &written {
                self.written.fetch_add(*n, Ordering::SeqCst);
            }
            written
        })
    }

    fn concurrent_writes(&self) -> usize {
        self.inner.concurrent_writes()
    }

    fn ping(&self) -> herald_core::BoxFuture<'_, Result<(), herald_core::StoreError>> {
        self.inner.ping()
    }

    fn history(
        &self,
        key: &herald_core::RoomKey,
        epoch: &str,
        query: herald_core::HistoryQuery,
    ) -> herald_core::BoxFuture<'_, Result<Vec<Arc<herald_core::Message>>, herald_core::StoreError>>
    {
        self.inner.history(key, epoch, query)
    }
}

#[tokio::test]
async fn the_worker_writes_postgres_batches_in_parallel_and_stores_each_message_once() {
    use herald_core::PersistQueue;
    use std::sync::atomic::Ordering;
    const N: u64 = 2_000;
    let url = testing::postgres_url().await;
    let store = Arc::new(Watched {
        inner: PostgresStore::connect(&url).await.expect("postgres"),
        in_flight: Default::default(),
        most: Default::default(),
        written: Default::default(),
    });
    let queue = Arc::new(herald_store::MemoryQueue::new(N as usize));
    let key = herald_core::testsuite::key("parallel");
    for offset in 1..=N {
        let mut publication = herald_core::testsuite::publication(&key, &offset.to_string());
        publication.ts = 1_700_000_000_000;
        queue
            .push(Arc::new(publication.at(offset, "e".into())))
            .await
            .expect("push");
    }
    let settings = herald_store::WorkerSettings {
        id: "parallel".into(),
        batch_size: 100,
        batch_timeout: std::time::Duration::from_millis(20),
        max_backoff: std::time::Duration::from_secs(1),
    };
    let watched = store.clone();
    let all_written = async move {
        while watched.written.load(Ordering::SeqCst) < N {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        herald_store::Worker::new(queue.clone(), store.clone(), settings).run(all_written),
    )
    .await
    .expect("the worker stores everything within 60 s");
    let most = store.most.load(Ordering::SeqCst);
    assert!(
        most > 1 && most <= store.concurrent_writes(),
        "{most} batches in flight at most; PostgreSQL takes {}",
        store.concurrent_writes()
    );
    let rows = store
        .history(
            &key,
            "e",
            herald_core::HistoryQuery {
                since: Some(0),
                before: None,
                limit: 10_000,
            },
        )
        .await
        .expect("history");
    let offsets: Vec<u64> = rows.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, (1..=N).collect::<Vec<_>>(), "every message once");
    assert_eq!(
        queue.pending().await.expect("pending"),
        0,
        "all acknowledged"
    );
}

/// PostgreSQL's text and `jsonb` cannot hold the NUL character, and `jsonb` refuses unpaired
/// UTF-16 surrogates. A message carrying either must not fail its batch for good and stall
/// the worker: it is stored with U+FFFD in their place, the rest of the batch beside it, and
/// the row's timestamp and offset come back as written.
#[tokio::test]
async fn postgres_stores_a_batch_holding_characters_it_cannot_keep_instead_of_failing_it() {
    let url = testing::postgres_url().await;
    let store = PostgresStore::connect(&url).await.expect("postgres");
    let key = herald_core::testsuite::key("nul");
    let mut poisoned =
        herald_core::testsuite::publication(&key, r#"{"t":"a\u0000b","s":"\ud800"}"#);
    poisoned.from = herald_core::UserId::new("eve\0");
    poisoned.ts = 1_700_000_000_123;
    let batch: Vec<Arc<herald_core::Message>> = vec![
        Arc::new(herald_core::testsuite::publication(&key, "1").at(1, "e".into())),
        Arc::new(poisoned.at(2, "e".into())),
        Arc::new(herald_core::testsuite::publication(&key, "3").at(3, "e".into())),
    ];
    assert_eq!(store.write(&batch).await.expect("the batch is stored"), 3);
    let all = herald_core::HistoryQuery {
        since: Some(0),
        before: None,
        limit: 10,
    };
    let rows = store.history(&key, "e", all).await.expect("history");
    let got: Vec<(u64, String, String, i64)> = rows
        .iter()
        .map(|m| (m.offset, m.from.to_string(), m.data.get().to_owned(), m.ts))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "tester".to_owned(), "1".to_owned(), 1),
            (
                2,
                "eve\u{FFFD}".to_owned(),
                r#"{"s": "�", "t": "a�b"}"#.to_owned(),
                1_700_000_000_123
            ),
            (3, "tester".to_owned(), "3".to_owned(), 1),
        ]
    );
    // Written again (a re-delivered batch), through the staging path: nothing new.
    assert_eq!(store.write(&batch).await.expect("idempotent"), 0);
}
