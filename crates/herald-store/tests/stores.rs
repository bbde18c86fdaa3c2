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
