//! Idempotency keys against a real PostgreSQL, where their races are decided: a key that
//! vanishes while a retry waits for it.

use std::time::Duration;

use payment_svc::domain::IdempotencyKey;
use payment_svc::error::Error;
use payment_svc::idempotency::{self, Claim, Claimed};
use sqlx::{Connection as _, PgConnection, PgPool};
use tests::postgres::TestDatabase;

const METHOD: &str = "/paysuite.payments.v1.PaymentService/RefundPayment";

/// A retry finds the key taken (its insert does nothing) and waits for the key's row
/// lock, held by the request that took it; that request failed before changing anything
/// and releases the key. The retry must be told IN_USE (ABORTED: retry), never INTERNAL
/// — and its next claim gets the key afresh.
#[tokio::test]
async fn a_key_released_while_a_retry_waits_for_its_row_is_in_use_then_free() -> anyhow::Result<()>
{
    let database = TestDatabase::create().await?;
    payment_svc::db::migrate(&database.payment_config()).await?;
    let pool = PgPool::connect(&database.service_url()).await?;
    let key = IdempotencyKey::parse("refund-race")?;
    let claim = Claim {
        owner_id: "alice",
        method: METHOD,
        key: &key,
        fingerprint: idempotency::fingerprint(b"refund 500"),
    };
    let lease = Duration::from_secs(30);
    assert!(matches!(
        idempotency::claim_leased(&pool, &claim, lease).await?,
        Claimed::New
    ));

    // The first request's transaction holds the key's row while it fails…
    let mut first = PgConnection::connect(&database.owner_url()).await?;
    let mut failing = first.begin().await?;
    sqlx::query("SELECT 1 FROM idempotency_keys WHERE key = $1 FOR UPDATE")
        .bind(key.as_str())
        .execute(&mut *failing)
        .await?;
    // …the retry's insert finds the key and its read waits for that row lock…
    let retry = tokio::spawn({
        let pool = pool.clone();
        let key = key.clone();
        async move {
            let claim = Claim {
                owner_id: "alice",
                method: METHOD,
                key: &key,
                fingerprint: idempotency::fingerprint(b"refund 500"),
            };
            idempotency::claim_leased(&pool, &claim, lease).await
        }
    });
    let waiting = async {
        // Only a superuser sees other roles' sessions in pg_stat_activity.
        let mut observer = PgConnection::connect(&database.superuser_url()?).await?;
        loop {
            let waits: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
                 AND wait_event_type = 'Lock'",
            )
            .bind(database.name())
            .fetch_one(&mut observer)
            .await?;
            if waits > 0 {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(tests::LIVENESS, waiting).await??;
    // …and the first request releases the key (nothing was done) and ends.
    sqlx::query("DELETE FROM idempotency_keys WHERE key = $1 AND recovery_point = 'started'")
        .bind(key.as_str())
        .execute(&mut *failing)
        .await?;
    failing.commit().await?;
    let answered = tokio::time::timeout(tests::LIVENESS, retry).await??;
    assert!(
        matches!(answered, Err(Error::IdempotencyKeyInUse)),
        "{answered:?}"
    );
    // Retried, the key is free: claimed afresh.
    assert!(matches!(
        idempotency::claim_leased(&pool, &claim, lease).await?,
        Claimed::New
    ));
    Ok(())
}
