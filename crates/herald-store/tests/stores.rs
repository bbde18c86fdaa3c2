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
