//! `payment-svc reconcile`: compares what the acquirer did with what payment-svc
//! recorded, and reports every difference.
//!
//! Three views must agree:
//! - the acquirer's operations (listed through the connector, page by page);
//! - the attempts table (one row per acquirer call, written before the call);
//! - the payments (`amount_captured`, `amount_refunded`) and the ledger's movements.
//!
//! Differences reported:
//! - an operation at the acquirer without an attempt (a charge nobody asked for), or one
//!   whose kind, amount or outcome differs from its attempt's;
//! - an attempt recorded as answered (approved, declined) that the acquirer never saw;
//! - an attempt whose outcome is still open (pending, unknown) — it needs settling;
//! - per payment: approved captures at the acquirer ≠ `amount_captured` ≠ the capture
//!   movements into the merchant; approved refunds ≠ `amount_refunded` ≠ the settled
//!   refund movements.
//!
//! It only reads (as the service role) and can run beside serving replicas; a request in
//! flight at that moment shows as an open attempt, so run it again before acting on one.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{PgPool, Row};

use crate::acquirer::{Acquirer, Operation, OperationKind, OperationStatus};
use crate::error::Error;

/// Operations listed per acquirer call.
const PAGE: usize = 500;

/// What a reconciliation found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Operations the acquirer listed.
    pub operations: usize,
    /// Attempts in the database.
    pub attempts: usize,
    /// Payments compared.
    pub payments: usize,
    /// One line per difference.
    pub differences: Vec<String>,
}

struct AttemptRow {
    payment_id: String,
    kind: String,
    amount: i64,
    currency: String,
    status: String,
}

#[derive(Default)]
struct Sums {
    captured: i64,
    refunded: i64,
}

/// Compares the acquirer's operations with attempts, payments and the ledger.
pub async fn reconcile(pool: &PgPool, acquirer: &dyn Acquirer) -> Result<Report, Error> {
    let mut operations = Vec::new();
    loop {
        let page = acquirer
            .list_operations(None, operations.len(), PAGE)
            .await
            .map_err(|err| {
                Error::Unavailable(format!("listing the acquirer's operations: {err}"))
            })?;
        let last = page.len() < PAGE;
        operations.extend(page);
        if last {
            break;
        }
    }
    let attempts = load_attempts(pool).await?;
    let mut report = Report {
        operations: operations.len(),
        attempts: attempts.len(),
        ..Report::default()
    };
    let differences = &mut report.differences;

    // The acquirer's view, operation by operation, and its sums per payment.
    let mut seen = BTreeSet::new();
    let mut acquirer_sums: BTreeMap<String, Sums> = BTreeMap::new();
    for operation in &operations {
        seen.insert(operation.operation_id.as_str());
        if operation.status == OperationStatus::Approved {
            let sums = acquirer_sums
                .entry(operation.reference.clone())
                .or_default();
            match operation.kind {
                OperationKind::Capture => sums.captured += operation.amount.amount_minor(),
                OperationKind::Refund => sums.refunded += operation.amount.amount_minor(),
                OperationKind::Authorize | OperationKind::Void => {}
            }
        }
        match attempts.get(&operation.operation_id) {
            None => differences.push(format!(
                "operation {} ({} of {}, {}) at the acquirer has no attempt",
                operation.operation_id,
                operation.kind.as_str(),
                operation.amount,
                outcome(operation)
            )),
            Some(attempt) => compare(operation, attempt, differences),
        }
    }
    // Attempts the acquirer should know about.
    for (id, attempt) in &attempts {
        if seen.contains(id.as_str()) {
            continue;
        }
        match attempt.status.as_str() {
            "approved" | "declined" => differences.push(format!(
                "attempt {id} ({} of payment {}) is {} here but unknown at the acquirer",
                attempt.kind, attempt.payment_id, attempt.status
            )),
            "pending" | "unknown" => differences.push(format!(
                "attempt {id} ({} of payment {}) is {}: its outcome is not settled (the acquirer never received it)",
                attempt.kind, attempt.payment_id, attempt.status
            )),
            // Failed without effect: nothing to find at the acquirer.
            _ => {}
        }
    }

    // Per payment: the acquirer's sums, the payment's amounts, the ledger's movements.
    let rows = sqlx::query(
        "SELECT p.id, p.amount_captured, p.amount_refunded, \
           coalesce((SELECT sum(m.amount) FROM movements m WHERE m.kind = 'capture' AND m.reference_id = p.id), 0)::bigint AS ledger_captured, \
           coalesce((SELECT sum(m.amount) FROM movements m JOIN refunds r ON r.id = m.reference_id \
                     WHERE m.kind = 'refund_settle' AND r.payment_id = p.id), 0)::bigint AS ledger_refunded \
         FROM payments p ORDER BY p.id",
    )
    .fetch_all(pool)
    .await?;
    report.payments = rows.len();
    for row in &rows {
        let id: String = row.try_get("id")?;
        let sums = acquirer_sums.remove(&id).unwrap_or_default();
        let captured: i64 = row.try_get("amount_captured")?;
        let refunded: i64 = row.try_get("amount_refunded")?;
        let ledger_captured: i64 = row.try_get("ledger_captured")?;
        let ledger_refunded: i64 = row.try_get("ledger_refunded")?;
        if !(sums.captured == captured && captured == ledger_captured) {
            differences.push(format!(
                "payment {id}: captured {} at the acquirer, amount_captured {captured}, {ledger_captured} moved to the merchant",
                sums.captured
            ));
        }
        if !(sums.refunded == refunded && refunded == ledger_refunded) {
            differences.push(format!(
                "payment {id}: refunded {} at the acquirer, amount_refunded {refunded}, {ledger_refunded} settled from the merchant",
                sums.refunded
            ));
        }
    }
    for (reference, sums) in acquirer_sums {
        if sums.captured != 0 || sums.refunded != 0 {
            differences.push(format!(
                "the acquirer captured {} and refunded {} for {reference:?}, which is no payment here",
                sums.captured, sums.refunded
            ));
        }
    }
    Ok(report)
}

async fn load_attempts(pool: &PgPool) -> Result<BTreeMap<String, AttemptRow>, Error> {
    let rows = sqlx::query("SELECT id, payment_id, kind, amount, currency, status FROM attempts")
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get("id")?,
                AttemptRow {
                    payment_id: row.try_get("payment_id")?,
                    kind: row.try_get("kind")?,
                    amount: row.try_get("amount")?,
                    currency: row.try_get("currency")?,
                    status: row.try_get("status")?,
                },
            ))
        })
        .collect()
}

/// The acquirer's outcome in the attempts table's words.
fn outcome(operation: &Operation) -> &'static str {
    match operation.status {
        OperationStatus::Approved => "approved",
        OperationStatus::Declined { .. } => "declined",
        OperationStatus::Failed { .. } => "failed",
    }
}

fn compare(operation: &Operation, attempt: &AttemptRow, differences: &mut Vec<String>) {
    let id = &operation.operation_id;
    if attempt.kind != operation.kind.as_str() {
        differences.push(format!(
            "operation {id} is a {} at the acquirer but a {} attempt here",
            operation.kind.as_str(),
            attempt.kind
        ));
    }
    if attempt.amount != operation.amount.amount_minor()
        || attempt.currency != operation.amount.currency().code()
    {
        differences.push(format!(
            "operation {id} is {} at the acquirer but {} {} here",
            operation.amount, attempt.amount, attempt.currency
        ));
    }
    if attempt.status != outcome(operation) {
        differences.push(format!(
            "operation {id} is {} at the acquirer but {} here",
            outcome(operation),
            attempt.status
        ));
    }
}
