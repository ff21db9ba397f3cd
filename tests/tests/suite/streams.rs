//! Live streams across replicas: WatchBalance and WatchPaymentEvents on one payment-svc
//! see changes made through another (two services, one database), woken by NOTIFY — the
//! safety-net poll is set far above the bounds here — and WatchPaymentEvents delivers
//! every committed event exactly once in cursor order, even when transactions commit out
//! of order, and resumes from a cursor without missing any.

use std::time::Duration;

use payment_svc::payments::events;
use proto::payments::v1 as pb;
use sqlx::{Connection, PgConnection};
use tests::payments::{Tenant, cards, payment_request};
use tests::postgres::TestDatabase;
use tests::services::{self, RunningService};
use tokio_stream::StreamExt as _;

/// An event for payment `$1` of alice's, written by hand in a transaction the test controls
/// (no NOTIFY: only the stream's own re-checks can find it).
const INSERT_EVENT: &str = "INSERT INTO payment_events (owner_id, type, payment_id, status, amount_captured, \
                            amount_refunded, changed_at) VALUES ('alice', 'payment.succeeded', $1, 'succeeded', 100, 0, now())";

/// Far above every bound in these tests: only NOTIFY can deliver in time.
const POLL: Duration = Duration::from_secs(60);
/// The bound for a change to reach a stream on another replica.
const DELIVERY: Duration = Duration::from_secs(10);

async fn replica(database: &TestDatabase) -> anyhow::Result<(RunningService, Tenant)> {
    let service = services::payment_with(database, |config| {
        config.stream_poll_interval = POLL;
        config.jobs.enabled = false;
    })
    .await?;
    let channel = tonic::transport::Channel::from_shared(service.endpoint())?
        .connect()
        .await?;
    Ok((service, Tenant::new("alice", channel)))
}

#[tokio::test]
async fn a_balance_stream_on_one_replica_sees_a_payment_made_through_another() -> anyhow::Result<()>
{
    let database = TestDatabase::create().await?;
    let (first, alice_1) = replica(&database).await?;
    let (second, alice_2) = replica(&database).await?;
    let merchant = alice_1
        .open_account(pb::AccountKind::Merchant, "BRL", false)
        .await?
        .id;
    let mut stream = alice_1
        .client()
        .watch_balance(alice_1.request(pb::WatchBalanceRequest {
            account_id: merchant.clone(),
        }))
        .await?
        .into_inner();
    let current = stream.next().await.transpose()?.and_then(|m| m.balance);
    assert_eq!(
        current
            .as_ref()
            .and_then(|b| b.balance.as_ref())
            .map(|m| m.amount_minor),
        Some(0)
    );

    alice_2
        .pay(payment_request(
            "via-2",
            &merchant,
            4_321,
            cards::CARD_APPROVED,
        ))
        .await?;
    let changed = tokio::time::timeout(DELIVERY, stream.next())
        .await?
        .transpose()?
        .and_then(|m| m.balance)
        .unwrap_or_default();
    assert_eq!(changed.balance.map(|m| m.amount_minor), Some(4_321));
    assert!(changed.version > current.map(|b| b.version).unwrap_or_default());

    // Another tenant's account is not found, before any stream starts.
    let bob = alice_1.as_principal("bob");
    let refused = bob
        .client()
        .watch_balance(bob.request(pb::WatchBalanceRequest {
            account_id: merchant,
        }))
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(refused, Some(tonic::Code::NotFound));
    drop(stream);
    first.stop().await?;
    second.stop().await
}

/// Reads `count` events (within the delivery bound each).
async fn take(
    stream: &mut tonic::Streaming<pb::WatchPaymentEventsResponse>,
    count: usize,
) -> anyhow::Result<Vec<pb::PaymentEvent>> {
    let mut events = Vec::new();
    while events.len() < count {
        let next = tokio::time::timeout(DELIVERY, stream.next())
            .await
            .map_err(|_| anyhow::anyhow!("only {} of {count} events arrived", events.len()))?;
        if let Some(event) = next.transpose()?.and_then(|m| m.event) {
            events.push(event);
        }
    }
    Ok(events)
}

#[tokio::test]
async fn payment_events_arrive_once_in_cursor_order_despite_late_commits() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (first, alice_1) = replica(&database).await?;
    let (second, alice_2) = replica(&database).await?;
    let merchant = alice_1
        .open_account(pb::AccountKind::Merchant, "BRL", false)
        .await?
        .id;
    let seed = alice_2
        .pay(payment_request(
            "seed",
            &merchant,
            100,
            cards::CARD_APPROVED,
        ))
        .await?
        .into_inner()
        .payment
        .unwrap_or_default();
    let seed_last = seed_last_event(&database, &seed.id).await?;
    let mut consumer = alice_1
        .client()
        .watch_payment_events(alice_1.request(pb::WatchPaymentEventsRequest::default()))
        .await?
        .into_inner();

    // A writer takes its transaction id now and commits last; another rolls back.
    let mut late = PgConnection::connect(&database.owner_url()).await?;
    let mut late_tx = late.begin().await?;
    sqlx::query(INSERT_EVENT)
        .bind(&seed.id)
        .execute(&mut *late_tx)
        .await?;
    let mut doomed = PgConnection::connect(&database.owner_url()).await?;
    let mut doomed_tx = doomed.begin().await?;
    sqlx::query(INSERT_EVENT)
        .bind(&seed.id)
        .execute(&mut *doomed_tx)
        .await?;

    // Meanwhile payments commit through both replicas (2 events each).
    for n in 0..3 {
        let tenant = if n % 2 == 0 { &alice_1 } else { &alice_2 };
        tenant
            .pay(payment_request(
                &format!("pay-{n}"),
                &merchant,
                1_000 + n,
                cards::CARD_APPROVED,
            ))
            .await?;
    }
    // Nothing may be delivered past the open transaction's events…
    let early = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await;
    assert!(
        early.is_err(),
        "an event was delivered while an older transaction was open"
    );
    doomed_tx.rollback().await?;
    late_tx.commit().await?;
    // …then all of them, once, in cursor order.
    let delivered = take(&mut consumer, 7).await?;
    let committed: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM payment_events WHERE owner_id = 'alice' AND id > $1 ORDER BY xid, id",
    )
    .bind(seed_last)
    .fetch_all(&mut late)
    .await?;
    let ids: Vec<i64> = delivered.iter().map(|e| e.id).collect();
    assert_eq!(
        ids, committed,
        "every committed event exactly once, in (xid, id) order"
    );
    assert_eq!(committed.len(), 7);
    let types: Vec<i32> = delivered.iter().map(|e| e.r#type).collect();
    assert_eq!(
        types[0],
        pb::PaymentEventType::PaymentSucceeded as i32,
        "the late writer's event comes first"
    );

    // A consumer that stops after three resumes from its cursor and misses nothing.
    let cursor = delivered[2].cursor.clone();
    drop(consumer);
    let mut resumed = alice_2
        .client()
        .watch_payment_events(alice_2.request(pb::WatchPaymentEventsRequest { cursor }))
        .await?
        .into_inner();
    let rest = take(&mut resumed, 4).await?;
    assert_eq!(
        rest.iter().map(|e| e.id).collect::<Vec<_>>(),
        committed[3..]
    );
    // A cursor is bound to its principal.
    let bob = alice_1.as_principal("bob");
    let stolen = bob
        .client()
        .watch_payment_events(bob.request(pb::WatchPaymentEventsRequest {
            cursor: delivered[2].cursor.clone(),
        }))
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(stolen, Some(tonic::Code::InvalidArgument));
    drop(resumed);
    first.stop().await?;
    second.stop().await
}

/// A consumer whose stream broke before its first event resumes from the start cursor the
/// stream's headers carried, and misses nothing. The resumed stream's first batch is
/// partial — later events wait behind an open transaction — and those still arrive soon
/// after that transaction ends without a notification (a rollback), not at the slow poll.
#[tokio::test]
async fn a_stream_broken_before_its_first_event_resumes_from_the_start_cursor_in_its_headers()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (service, alice) = replica(&database).await?;
    let merchant = alice
        .open_account(pb::AccountKind::Merchant, "BRL", false)
        .await?
        .id;
    let first = alice
        .client()
        .watch_payment_events(alice.request(pb::WatchPaymentEventsRequest::default()))
        .await?;
    let start = first
        .metadata()
        .get(payment_svc::START_CURSOR_HEADER)
        .ok_or_else(|| anyhow::anyhow!("no start cursor in {:?}", first.metadata()))?
        .to_str()?
        .to_owned();
    // The stream breaks before any event; payments commit while nobody watches, the
    // second behind a transaction that holds its events back.
    drop(first);
    let pay = async |n: i64| {
        alice
            .pay(payment_request(
                &format!("unwatched-{n}"),
                &merchant,
                500 + n,
                cards::CARD_APPROVED,
            ))
            .await
    };
    pay(0).await?;
    let mut holder = PgConnection::connect(&database.owner_url()).await?;
    let mut holding = holder.begin().await?;
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *holding)
        .await?;
    pay(1).await?;
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    let committed: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM payment_events WHERE owner_id = 'alice' ORDER BY xid, id",
    )
    .fetch_all(&mut owner)
    .await?;
    assert_eq!(committed.len(), 4, "two events per payment");

    let mut resumed = alice
        .client()
        .watch_payment_events(alice.request(pb::WatchPaymentEventsRequest { cursor: start }))
        .await?
        .into_inner();
    let before = take(&mut resumed, 2).await?;
    assert_eq!(
        before.iter().map(|e| e.id).collect::<Vec<_>>(),
        committed[..2]
    );
    holding.rollback().await?;
    let after = take(&mut resumed, 2).await?;
    assert_eq!(
        after.iter().map(|e| e.id).collect::<Vec<_>>(),
        committed[2..],
        "nothing committed after the first stream began is missed"
    );
    drop(resumed);
    service.stop().await
}

/// A transaction that commits between a stream's read (nothing deliverable yet) and its
/// held-back check must still make the stream look again soon: its events are no longer
/// held back, but they were not delivered either, and no notification will come.
#[tokio::test]
async fn an_event_committed_between_the_read_and_the_held_back_check_is_looked_for_again()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (service, alice) = replica(&database).await?;
    let merchant = alice
        .open_account(pb::AccountKind::Merchant, "BRL", false)
        .await?
        .id;
    let seed = alice
        .pay(payment_request(
            "seed",
            &merchant,
            100,
            cards::CARD_APPROVED,
        ))
        .await?
        .into_inner()
        .payment
        .unwrap_or_default();
    let mut reader = PgConnection::connect(&database.owner_url()).await?;
    let (xid, id): (i64, i64) = sqlx::query_as(
        "SELECT xid::text::bigint, id FROM payment_events WHERE payment_id = $1 ORDER BY xid DESC, id DESC LIMIT 1",
    )
    .bind(&seed.id)
    .fetch_one(&mut reader)
    .await?;
    let cursor = events::Cursor { xid, id };

    let mut late = PgConnection::connect(&database.owner_url()).await?;
    let mut late_tx = late.begin().await?;
    sqlx::query(INSERT_EVENT)
        .bind(&seed.id)
        .execute(&mut *late_tx)
        .await?;
    let read = events::after(&mut reader, "alice", cursor, 10).await?;
    assert!(read.is_empty(), "an open transaction's event was delivered");
    late_tx.commit().await?;
    assert!(
        events::held_back(&mut reader, "alice", cursor).await?,
        "the stream would wait for its slow poll"
    );
    service.stop().await
}

/// The id of the seed payment's last event (the stream starts after it).
async fn seed_last_event(database: &TestDatabase, payment_id: &str) -> anyhow::Result<i64> {
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    Ok(
        sqlx::query_scalar("SELECT max(id) FROM payment_events WHERE payment_id = $1")
            .bind(payment_id)
            .fetch_one(&mut owner)
            .await?,
    )
}

#[tokio::test]
async fn a_balance_consumer_that_lags_gets_growing_versions_ending_at_the_latest()
-> anyhow::Result<()> {
    const TRANSFERS: i64 = 60;
    let database = TestDatabase::create().await?;
    let (service, alice) = replica(&database).await?;
    let funding = alice
        .open_account(pb::AccountKind::Customer, "BRL", true)
        .await?
        .id;
    let wallet = alice
        .open_account(pb::AccountKind::Customer, "BRL", false)
        .await?
        .id;
    let mut stream = alice
        .client()
        .watch_balance(alice.request(pb::WatchBalanceRequest {
            account_id: wallet.clone(),
        }))
        .await?
        .into_inner();
    // The consumer reads nothing while the balance changes many times; writers never wait
    // for it (the stream's task and buffer are its own).
    for n in 0..TRANSFERS {
        alice
            .transfer(&format!("t-{n}"), &funding, &wallet, 1, "BRL")
            .await?;
    }
    let (_, final_version) = alice.balance(&wallet).await?;
    let mut seen = Vec::new();
    let last = tokio::time::timeout(DELIVERY, async {
        loop {
            let balance = stream
                .next()
                .await
                .transpose()?
                .and_then(|m| m.balance)
                .unwrap_or_default();
            seen.push(balance.version);
            if balance.version == final_version {
                return anyhow::Ok(balance);
            }
        }
    })
    .await??;
    assert_eq!(last.balance.map(|m| m.amount_minor), Some(TRANSFERS));
    // Changes that land between two reads are coalesced (never more messages than
    // changes), and what arrives is never older than what came before.
    assert!(seen.len() <= usize::try_from(TRANSFERS + 1)?, "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "versions only grow: {seen:?}"
    );
    drop(stream);
    service.stop().await
}
