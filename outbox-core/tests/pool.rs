//! The pools' session settings, against a real PostgreSQL.

use outbox_core::db;
use outbox_core::testing::server_url;

async fn show_jit(url: &str) -> String {
    let pool = db::pool(url, 1, &[db::Schema::Outbox]).unwrap();
    let client = pool.get().await.unwrap();
    client.query_one("show jit", &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn sessions_run_without_jit_unless_the_url_turns_it_on() {
    assert_eq!(show_jit(&server_url()).await, "off");
    let sep = if server_url().contains('?') { '&' } else { '?' };
    let on = format!("{}{sep}options=-c%20jit%3Don", server_url());
    assert_eq!(show_jit(&on).await, "on");
}
