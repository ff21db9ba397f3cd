//! Payment events (the outbox): written in the same transaction as each state change,
//! read by WatchPaymentEvents in commit-safe order.
//!
//! Order without skips: each row carries its transaction's id (`xid8`). A reader delivers
//! only rows whose transaction is older than its snapshot's xmin — every such transaction
//! has ended, so no row below the cursor can still appear — in (xid, id) order, and
//! resumes after the (xid, id) cursor of the last row it delivered. A transaction that
//! commits late holds xmin back until it ends, so its events are delivered after it
//! commits, never skipped. Delivery is at least once: a consumer resumes from the last
//! cursor it processed.

use sqlx::{PgConnection, Row};

use super::{PAYMENT_SELECT, Payment, PaymentStatus, Refund, get_refund, payment_from_row};
use crate::error::{Error, stored_names};

/// The channel a committed event notifies (payload: the owner id).
pub const CHANNEL: &str = "paysuite_events";

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// A payment was created.
    PaymentCreated,
    /// A payment is waiting for the acquirer.
    PaymentProcessing,
    /// A payment was authorized and awaits capture.
    PaymentRequiresCapture,
    /// A payment was captured.
    PaymentSucceeded,
    /// A payment failed.
    PaymentFailed,
    /// A payment was canceled.
    PaymentCanceled,
    /// A refund was created.
    RefundCreated,
    /// A refund succeeded.
    RefundSucceeded,
    /// A refund failed.
    RefundFailed,
}

stored_names!(EventType {
    PaymentCreated => "payment.created",
    PaymentProcessing => "payment.processing",
    PaymentRequiresCapture => "payment.requires_capture",
    PaymentSucceeded => "payment.succeeded",
    PaymentFailed => "payment.failed",
    PaymentCanceled => "payment.canceled",
    RefundCreated => "refund.created",
    RefundSucceeded => "refund.succeeded",
    RefundFailed => "refund.failed",
});

impl EventType {
    /// The event of a payment entering `status` (`None` for PENDING: creation says it).
    pub fn of_status(status: PaymentStatus) -> Option<Self> {
        match status {
            PaymentStatus::Pending => None,
            PaymentStatus::Processing => Some(Self::PaymentProcessing),
            PaymentStatus::RequiresCapture => Some(Self::PaymentRequiresCapture),
            PaymentStatus::Succeeded => Some(Self::PaymentSucceeded),
            PaymentStatus::Failed => Some(Self::PaymentFailed),
            PaymentStatus::Canceled => Some(Self::PaymentCanceled),
        }
    }
}

/// Where a stream is: after the event with this transaction id and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    /// The transaction id of the last delivered event.
    pub xid: i64,
    /// Its id.
    pub id: i64,
}

/// One event, with its subject as it was right after the change.
#[derive(Debug, Clone)]
pub struct Event {
    /// The event's id.
    pub id: i64,
    /// Where a stream resumes after it.
    pub cursor: Cursor,
    /// What happened.
    pub event_type: EventType,
    /// The payment (for refund events, the refunded payment).
    pub payment: Payment,
    /// The refund, for refund events.
    pub refund: Option<Refund>,
    /// When the change was written.
    pub occurred_at: chrono::DateTime<chrono::Utc>,
}

/// Records that `payment_id` changed, in the changing transaction.
pub async fn payment_changed(
    connection: &mut PgConnection,
    payment_id: &str,
    event_type: EventType,
) -> Result<(), Error> {
    record(connection, payment_id, None, event_type).await
}

/// Records that `refund_id` changed, in the changing transaction.
pub async fn refund_changed(
    connection: &mut PgConnection,
    payment_id: &str,
    refund_id: &str,
    event_type: EventType,
) -> Result<(), Error> {
    record(connection, payment_id, Some(refund_id), event_type).await
}

async fn record(
    connection: &mut PgConnection,
    payment_id: &str,
    refund_id: Option<&str>,
    event_type: EventType,
) -> Result<(), Error> {
    let owner: String = sqlx::query_scalar(
        "INSERT INTO payment_events (owner_id, type, payment_id, refund_id, status, amount_captured, \
           amount_refunded, failure_code, failure_message, changed_at) \
         SELECT p.owner_id, $2, p.id, r.id, coalesce(r.status, p.status), p.amount_captured, p.amount_refunded, \
           coalesce(r.failure_code, p.failure_code), coalesce(r.failure_message, p.failure_message), \
           coalesce(r.updated_at, p.updated_at) \
         FROM payments p LEFT JOIN refunds r ON r.id = $3 WHERE p.id = $1 RETURNING owner_id",
    )
    .bind(payment_id)
    .bind(event_type.as_str())
    .bind(refund_id)
    .fetch_one(&mut *connection)
    .await?;
    crate::notify::queue(connection, CHANNEL, &owner).await?;
    Ok(())
}

/// Where "from now on" starts for `owner_id`: the cursor below every transaction still
/// running, and the events above it that had already committed (a stream skips those:
/// they were committed before it started).
pub async fn current_cursor(
    connection: &mut PgConnection,
    owner_id: &str,
) -> Result<(Cursor, Vec<i64>), Error> {
    let xmin: i64 =
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            .fetch_one(&mut *connection)
            .await?;
    let committed: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM payment_events WHERE owner_id = $1 AND xid::text::bigint >= $2",
    )
    .bind(owner_id)
    .bind(xmin)
    .fetch_all(&mut *connection)
    .await?;
    Ok((
        Cursor {
            xid: xmin - 1,
            id: i64::MAX,
        },
        committed,
    ))
}

/// Whether `owner_id` has any event after `cursor`. Asked after [`after`] found nothing:
/// such events wait behind a transaction that had not ended — or ended since, between the
/// two statements — and streams then look again shortly, because a transaction that rolls
/// back or dies sends no notification. (Asking only for events still held back would miss
/// a transaction that ended in between: nothing would be held back any more, nothing
/// delivered, and the stream would wait for its slow poll.)
pub async fn held_back(
    connection: &mut PgConnection,
    owner_id: &str,
    cursor: Cursor,
) -> Result<bool, Error> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM payment_events WHERE owner_id = $1 \
           AND (xid::text::bigint, id) > ($2, $3))",
    )
    .bind(owner_id)
    .bind(cursor.xid)
    .bind(cursor.id)
    .fetch_one(&mut *connection)
    .await?)
}

/// Up to `limit` of `owner_id`'s events after `cursor` whose transactions have ended.
pub async fn after(
    connection: &mut PgConnection,
    owner_id: &str,
    cursor: Cursor,
    limit: i64,
) -> Result<Vec<Event>, Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "WITH e AS ( \
           SELECT id, xid::text::bigint AS xid, type, payment_id, refund_id, status, amount_captured, \
             amount_refunded, failure_code, failure_message, changed_at, created_at \
           FROM payment_events \
           WHERE owner_id = $1 AND (xid::text::bigint, id) > ($2, $3) \
             AND xid < pg_snapshot_xmin(pg_current_snapshot()) \
           ORDER BY xid, id LIMIT $4) \
         SELECT e.id AS event_id, e.xid AS event_xid, e.type AS event_type, e.refund_id AS event_refund_id, \
           e.status AS event_status, e.amount_captured AS event_captured, e.amount_refunded AS event_refunded, \
           e.failure_code AS event_failure_code, e.failure_message AS event_failure_message, \
           e.changed_at AS event_changed_at, e.created_at AS event_created_at, sub.* \
         FROM e JOIN ({PAYMENT_SELECT}) sub ON sub.id = e.payment_id ORDER BY e.xid, e.id"
    )))
    .bind(owner_id)
    .bind(cursor.xid)
    .bind(cursor.id)
    .bind(limit)
    .fetch_all(&mut *connection)
    .await?;
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let event_type = EventType::parse(row.try_get("event_type")?)?;
        let mut payment = payment_from_row(row)?;
        let refund_id: Option<String> = row.try_get("event_refund_id")?;
        let status: String = row.try_get("event_status")?;
        let failure_code: String = row.try_get("event_failure_code")?;
        let failure_message: String = row.try_get("event_failure_message")?;
        let changed_at = row.try_get("event_changed_at")?;
        payment.amount_captured =
            crate::domain::Money::new(row.try_get("event_captured")?, payment.amount.currency());
        payment.amount_refunded =
            crate::domain::Money::new(row.try_get("event_refunded")?, payment.amount.currency());
        let refund = match refund_id {
            Some(refund_id) => {
                let mut refund = get_refund(connection, &refund_id).await?;
                refund.status = super::RefundStatus::parse(&status)?;
                refund.failure_code = failure_code;
                refund.failure_message = failure_message;
                refund.updated_at = changed_at;
                Some(refund)
            }
            None => {
                payment.status = PaymentStatus::parse(&status)?;
                payment.failure_code = failure_code;
                payment.failure_message = failure_message;
                payment.updated_at = changed_at;
                None
            }
        };
        events.push(Event {
            id: row.try_get("event_id")?,
            cursor: Cursor {
                xid: row.try_get("event_xid")?,
                id: row.try_get("event_id")?,
            },
            event_type,
            payment,
            refund,
            occurred_at: row.try_get("event_created_at")?,
        });
    }
    Ok(events)
}
