//! Domain values → protobuf messages, and page tokens.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use proto::payments::v1 as pb;
use serde::{Serialize, de::DeserializeOwned};

use crate::domain::Money;
use crate::ledger::{Account, AccountKind, Balance, Entry, MovementKind};

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
