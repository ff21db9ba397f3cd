//! Domain values → protobuf messages, and page tokens.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use proto::payments::v1 as pb;
use serde::{Serialize, de::DeserializeOwned};

use crate::domain::Money;
use crate::jobs::{Job, JobState};
use crate::ledger::{Account, AccountKind, Balance, Entry, MovementKind};
use crate::payments::events::{Event, EventType};
use crate::payments::{CaptureMethod, Payment, PaymentMode, PaymentStatus, Refund, RefundStatus};

pub(crate) fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub(crate) fn money(value: Money) -> pb::Money {
    pb::Money {
        amount_minor: value.amount_minor(),
        currency: value.currency().code().to_owned(),
    }
}

pub(crate) fn account(account: &Account) -> pb::Account {
    pb::Account {
        id: account.id.clone(),
        owner: account.owner_id.clone(),
        currency: account.currency.code().to_owned(),
        kind: match account.kind {
            AccountKind::Customer => pb::AccountKind::Customer,
            AccountKind::Merchant => pb::AccountKind::Merchant,
            AccountKind::System => pb::AccountKind::System,
        } as i32,
        allow_negative: account.allow_negative,
        display_name: account.display_name.clone(),
        labels: account.labels.clone(),
        create_time: Some(timestamp(account.created_at)),
    }
}

pub(crate) fn balance(account_id: &str, balance: Balance) -> pb::Balance {
    pb::Balance {
        account_id: account_id.to_owned(),
        balance: Some(money(balance.balance)),
        version: balance.version,
    }
}

pub(crate) fn entry(entry: &Entry) -> pb::LedgerEntry {
    pb::LedgerEntry {
        position: entry.position,
        movement_id: entry.movement_id.clone(),
        account_id: entry.account_id.clone(),
        amount: Some(money(entry.amount)),
        kind: match entry.kind {
            MovementKind::Capture => pb::MovementKind::Capture,
            MovementKind::RefundHold => pb::MovementKind::RefundHold,
            MovementKind::RefundSettle => pb::MovementKind::RefundSettle,
            MovementKind::RefundReverse => pb::MovementKind::RefundReverse,
            MovementKind::Transfer => pb::MovementKind::Transfer,
        } as i32,
        reference_id: entry.reference_id.clone(),
        create_time: Some(timestamp(entry.created_at)),
    }
}

/// An opaque page token: base64url of JSON that names the principal and filter it was
/// issued for, so it cannot be replayed by another principal or with another filter.
pub(crate) fn encode_token(token: &impl Serialize) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(token).unwrap_or_default())
}

/// Decodes a page token; `None` when it is not one of ours.
pub(crate) fn decode_token<T: DeserializeOwned>(token: &str) -> Option<T> {
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub(crate) fn payment_status(status: PaymentStatus) -> pb::PaymentStatus {
    match status {
        PaymentStatus::Pending => pb::PaymentStatus::Pending,
        PaymentStatus::Processing => pb::PaymentStatus::Processing,
        PaymentStatus::RequiresCapture => pb::PaymentStatus::RequiresCapture,
        PaymentStatus::Succeeded => pb::PaymentStatus::Succeeded,
        PaymentStatus::Failed => pb::PaymentStatus::Failed,
        PaymentStatus::Canceled => pb::PaymentStatus::Canceled,
    }
}

pub(crate) fn payment_mode(mode: PaymentMode) -> pb::PaymentMode {
    match mode {
        PaymentMode::Sync => pb::PaymentMode::Sync,
        PaymentMode::Async => pb::PaymentMode::Async,
    }
}

pub(crate) fn payment(payment: &Payment) -> pb::Payment {
    pb::Payment {
        id: payment.id.clone(),
        merchant_account_id: payment.merchant_account_id.clone(),
        amount: Some(money(payment.amount)),
        amount_captured: Some(money(payment.amount_captured)),
        amount_refunded: Some(money(payment.amount_refunded)),
        status: payment_status(payment.status) as i32,
        capture_method: match payment.capture_method {
            CaptureMethod::Automatic => pb::CaptureMethod::Automatic,
            CaptureMethod::Manual => pb::CaptureMethod::Manual,
        } as i32,
        mode: payment_mode(payment.mode) as i32,
        card: Some(pb::CardSummary {
            brand: payment.card_brand.clone(),
            last4: payment.card_last4.clone(),
            exp_month: i32::from(payment.card_exp_month),
            exp_year: i32::from(payment.card_exp_year),
        }),
        failure_code: payment.failure_code.clone(),
        failure_message: payment.failure_message.clone(),
        description: payment.description.clone(),
        metadata: payment.metadata.clone(),
        create_time: Some(timestamp(payment.created_at)),
        update_time: Some(timestamp(payment.updated_at)),
    }
}

pub(crate) fn refund(refund: &Refund) -> pb::Refund {
    pb::Refund {
        id: refund.id.clone(),
        payment_id: refund.payment_id.clone(),
        amount: Some(money(refund.amount)),
        status: match refund.status {
            RefundStatus::Pending => pb::RefundStatus::Pending,
            RefundStatus::Succeeded => pb::RefundStatus::Succeeded,
            RefundStatus::Failed => pb::RefundStatus::Failed,
        } as i32,
        reason: refund.reason.clone(),
        failure_code: refund.failure_code.clone(),
        failure_message: refund.failure_message.clone(),
        create_time: Some(timestamp(refund.created_at)),
        update_time: Some(timestamp(refund.updated_at)),
    }
}

pub(crate) fn job_state(state: JobState) -> pb::JobState {
    match state {
        JobState::Available => pb::JobState::Available,
        JobState::Scheduled => pb::JobState::Scheduled,
        JobState::Executing => pb::JobState::Executing,
        JobState::Retryable => pb::JobState::Retryable,
        JobState::Completed => pb::JobState::Completed,
        JobState::Cancelled => pb::JobState::Cancelled,
        JobState::Discarded => pb::JobState::Discarded,
        JobState::Dead => pb::JobState::Dead,
    }
}

/// A ListJobs filter: `None` for any state; `Err` when not a state.
pub(crate) fn job_state_filter(state: i32) -> Result<Option<JobState>, ()> {
    Ok(match pb::JobState::try_from(state).map_err(|_| ())? {
        pb::JobState::Unspecified => None,
        pb::JobState::Available => Some(JobState::Available),
        pb::JobState::Scheduled => Some(JobState::Scheduled),
        pb::JobState::Executing => Some(JobState::Executing),
        pb::JobState::Retryable => Some(JobState::Retryable),
        pb::JobState::Completed => Some(JobState::Completed),
        pb::JobState::Cancelled => Some(JobState::Cancelled),
        pb::JobState::Discarded => Some(JobState::Discarded),
        pb::JobState::Dead => Some(JobState::Dead),
    })
}

pub(crate) fn job(job: &Job) -> pb::Job {
    pb::Job {
        id: job.id,
        kind: job.kind.as_str().to_owned(),
        payment_id: job.payment_id.clone(),
        state: job_state(job.state) as i32,
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        last_error: job.last_error.clone(),
        schedule_time: Some(timestamp(job.schedule_at)),
        create_time: Some(timestamp(job.created_at)),
        update_time: Some(timestamp(job.updated_at)),
    }
}

pub(crate) fn event(event: &Event, cursor: String) -> pb::PaymentEvent {
    let event_type = match event.event_type {
        EventType::PaymentCreated => pb::PaymentEventType::PaymentCreated,
        EventType::PaymentProcessing => pb::PaymentEventType::PaymentProcessing,
        EventType::PaymentRequiresCapture => pb::PaymentEventType::PaymentRequiresCapture,
        EventType::PaymentSucceeded => pb::PaymentEventType::PaymentSucceeded,
        EventType::PaymentFailed => pb::PaymentEventType::PaymentFailed,
        EventType::PaymentCanceled => pb::PaymentEventType::PaymentCanceled,
        EventType::RefundCreated => pb::PaymentEventType::RefundCreated,
        EventType::RefundSucceeded => pb::PaymentEventType::RefundSucceeded,
        EventType::RefundFailed => pb::PaymentEventType::RefundFailed,
    };
    let subject = match &event.refund {
        Some(r) => pb::payment_event::Subject::Refund(refund(r)),
        None => pb::payment_event::Subject::Payment(payment(&event.payment)),
    };
    pb::PaymentEvent {
        id: event.id,
        cursor,
        r#type: event_type as i32,
        occur_time: Some(timestamp(event.occurred_at)),
        subject: Some(subject),
    }
}

/// JSON → `google.protobuf.Value`.
fn json_value(value: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        // Struct's number is a double, which cannot hold every i64 minor-unit amount
        // exactly: numbers travel as decimal strings instead.
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Kind::StringValue(i.to_string()),
            None => Kind::StringValue(n.to_string()),
        },
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_value).collect(),
        }),
        serde_json::Value::Object(_) => Kind::StructValue(json_struct(value)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A JSON object → `google.protobuf.Struct` (numbers as decimal strings: exact).
pub(crate) fn json_struct(value: &serde_json::Value) -> prost_types::Struct {
    let fields = match value {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k.clone(), json_value(v)))
            .collect(),
        _ => Default::default(),
    };
    prost_types::Struct { fields }
}

pub(crate) fn audit_record(record: &crate::audit::AuditRecord) -> pb::AuditRecord {
    pb::AuditRecord {
        id: record.id,
        principal: record.principal.clone(),
        action: record.action.clone(),
        entity_type: record.entity_type.clone(),
        entity_id: record.entity_id.clone(),
        before: record.before.as_ref().map(json_struct),
        after: record.after.as_ref().map(json_struct),
        request_id: record.request_id.clone(),
        trace_id: record.trace_id.clone().unwrap_or_default(),
        occur_time: Some(timestamp(record.occurred_at)),
    }
}
