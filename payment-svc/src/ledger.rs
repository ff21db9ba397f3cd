//! Accounts and the double-entry ledger (schema and invariants: the `ledger` migration).
//!
//! Every function takes the connection of the caller's transaction, so a movement, its
//! audit row and its idempotency record commit together or not at all. Lookups are
//! always scoped by owner: another principal's account is indistinguishable from a
//! missing one.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use crate::domain::{Currency, Money};
use crate::error::{Error, pg_code, stored_names};

/// What an account stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountKind {
    /// A customer's funds.
    Customer,
    /// A merchant's funds: credited by captures, debited by refunds.
    Merchant,
    /// The outside world (acquirer settlement, refunds pending); may go negative.
    System,
}

stored_names!(AccountKind {
    Customer => "customer",
    Merchant => "merchant",
    System => "system",
});

/// A ledger account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// `acct_…`.
    pub id: String,
    /// The owning principal.
    pub owner_id: String,
    /// Currency of every amount in the account.
    pub currency: Currency,
    /// What it stands for.
    pub kind: AccountKind,
    /// Whether the balance may go below zero.
    pub allow_negative: bool,
    /// A human-readable name.
    pub display_name: String,
    /// The owner's labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// A request to open an account (validated at the edge).
#[derive(Debug, Clone)]
pub struct NewAccount {
    /// The owning principal.
    pub owner_id: String,
    /// Its currency.
    pub currency: Currency,
    /// Customer or merchant.
    pub kind: AccountKind,
    /// Whether it may go negative.
    pub allow_negative: bool,
    /// A human-readable name.
    pub display_name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// An account's balance at a ledger position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balance {
    /// The balance.
    pub balance: Money,
    /// The highest ledger position included (0 before the first entry).
    pub version: i64,
}

/// Why money moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MovementKind {
    /// Acquirer settlement → merchant.
    Capture,
    /// Merchant → refunds pending.
    RefundHold,
    /// Refunds pending → acquirer settlement.
    RefundSettle,
    /// Refunds pending → merchant.
    RefundReverse,
    /// Between two accounts.
    Transfer,
}

stored_names!(MovementKind {
    Capture => "capture",
    RefundHold => "refund_hold",
    RefundSettle => "refund_settle",
    RefundReverse => "refund_reverse",
    Transfer => "transfer",
});

/// One movement of money to record.
#[derive(Debug, Clone)]
pub struct Movement {
    /// The principal causing it.
    pub owner_id: String,
    /// Why.
    pub kind: MovementKind,
    /// The payment, refund or transfer behind it.
    pub reference_id: String,
    /// The debited account.
    pub from_account_id: String,
    /// The credited account.
    pub to_account_id: String,
    /// How much (positive).
    pub amount: Money,
    /// Free text.
    pub description: String,
}

/// A recorded movement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posted {
    /// `mv_…`.
    pub movement_id: String,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
}

/// One side of a movement, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Ledger position.
    pub position: i64,
    /// The movement.
    pub movement_id: String,
    /// The account changed.
    pub account_id: String,
    /// Signed change (negative: debit).
    pub amount: Money,
    /// Why.
    pub kind: MovementKind,
    /// The payment, refund or transfer behind it.
    pub reference_id: String,
    /// When it was written.
    pub created_at: DateTime<Utc>,
}

/// The currency stored in a row's `currency` column (written by this service, so an
/// unknown code is an internal error).
pub fn stored_currency(row: &PgRow) -> Result<Currency, Error> {
    let code: &str = row.try_get("currency")?;
    Currency::parse(code).map_err(|err| Error::Internal(format!("stored currency: {err}")))
}

/// A new identifier: a type prefix and a time-ordered UUID.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

fn account_from_row(row: &PgRow) -> Result<Account, Error> {
    let labels: sqlx::types::Json<BTreeMap<String, String>> = row.try_get("labels")?;
    Ok(Account {
        id: row.try_get("id")?,
        owner_id: row.try_get("owner_id")?,
        currency: stored_currency(row)?,
        kind: AccountKind::parse(row.try_get("kind")?)?,
        allow_negative: row.try_get("allow_negative")?,
        display_name: row.try_get("display_name")?,
        labels: labels.0,
        created_at: row.try_get("created_at")?,
    })
}

const ACCOUNT_COLUMNS: &str =
    "id, owner_id, currency, kind, allow_negative, display_name, labels, created_at";

/// Opens an account.
pub async fn create_account(
    connection: &mut PgConnection,
    new: &NewAccount,
) -> Result<Account, Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO accounts (id, owner_id, currency, kind, allow_negative, display_name, labels) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {ACCOUNT_COLUMNS}"
    )))
    .bind(new_id("acct"))
    .bind(&new.owner_id)
    .bind(new.currency.code())
    .bind(new.kind.as_str())
    .bind(new.allow_negative)
    .bind(&new.display_name)
    .bind(sqlx::types::Json(&new.labels))
    .fetch_one(&mut *connection)
    .await?;
    for name in SYSTEM_ACCOUNTS {
        system_account(connection, name, new.currency).await?;
    }
    account_from_row(&row)
}

/// One of `owner_id`'s accounts.
pub async fn get_account(
    connection: &mut PgConnection,
    owner_id: &str,
    account_id: &str,
) -> Result<Account, Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1 AND owner_id = $2"
    )))
    .bind(account_id)
    .bind(owner_id)
    .fetch_optional(&mut *connection)
    .await?
    .ok_or(Error::NotFound("account"))?;
    account_from_row(&row)
}

/// A page of `owner_id`'s accounts, newest first, after the `after` key.
pub async fn list_accounts(
    connection: &mut PgConnection,
    owner_id: &str,
    after: Option<&(DateTime<Utc>, String)>,
    limit: i64,
) -> Result<Vec<Account>, Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts \
         WHERE owner_id = $1 AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3)) \
         ORDER BY created_at DESC, id DESC LIMIT $4"
    )))
    .bind(owner_id)
    .bind(after.map(|(at, _)| *at))
    .bind(after.map(|(_, id)| id.as_str()).unwrap_or(""))
    .bind(limit)
    .fetch_all(&mut *connection)
    .await?;
    rows.iter().map(account_from_row).collect()
}

/// The channel a committed movement notifies (streams of balances wake on it).
pub const CHANNEL: &str = "paysuite_ledger";

/// The system accounts of every currency in use.
pub const SYSTEM_ACCOUNTS: [&str; 2] = ["acquirer_settlement", "refunds_pending"];

/// The id of the system account `name:<currency>` (e.g. `acquirer_settlement:BRL`),
/// created on first use. The usual path only reads: creating one waits on a concurrent
/// creator's transaction, which is why [`create_account`] creates its currency's system
/// accounts ahead of any payment.
pub async fn system_account(
    connection: &mut PgConnection,
    name: &str,
    currency: Currency,
) -> Result<String, Error> {
    let key = format!("{name}:{}", currency.code());
    let existing: Option<String> =
        sqlx::query_scalar("SELECT id FROM accounts WHERE system_key = $1")
            .bind(&key)
            .fetch_optional(&mut *connection)
            .await?;
    if let Some(id) = existing {
        return Ok(id);
    }
    sqlx::query(
        "INSERT INTO accounts (id, owner_id, currency, kind, allow_negative, display_name, system_key) \
         VALUES ($1, 'system', $2, 'system', true, $3, $3) ON CONFLICT (system_key) DO NOTHING",
    )
    .bind(new_id("acct"))
    .bind(currency.code())
    .bind(&key)
    .execute(&mut *connection)
    .await?;
    let id: String = sqlx::query_scalar("SELECT id FROM accounts WHERE system_key = $1")
        .bind(&key)
        .fetch_one(&mut *connection)
        .await?;
    Ok(id)
}

/// The balance of one of `owner_id`'s accounts, read in one snapshot.
pub async fn balance(
    connection: &mut PgConnection,
    owner_id: &str,
    account_id: &str,
) -> Result<Balance, Error> {
    let row = sqlx::query(
        "SELECT a.currency, \
                (a.balance + coalesce((SELECT sum(d.amount) FROM balance_deltas d WHERE d.account_id = a.id), 0))::bigint AS balance, \
                coalesce((SELECT max(e.position) FROM ledger_entries e WHERE e.account_id = a.id), 0) AS version \
         FROM accounts a WHERE a.id = $1 AND a.owner_id = $2",
    )
    .bind(account_id)
    .bind(owner_id)
    .fetch_optional(&mut *connection)
    .await?
    .ok_or(Error::NotFound("account"))?;
    let currency = stored_currency(&row)?;
    Ok(Balance {
        balance: Money::new(row.try_get("balance")?, currency),
        version: row.try_get("version")?,
    })
}

/// Entries of one of `owner_id`'s accounts in ledger order, after position `after`.
pub async fn list_entries(
    connection: &mut PgConnection,
    owner_id: &str,
    account_id: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<Entry>, Error> {
    get_account(connection, owner_id, account_id).await?;
    let rows = sqlx::query(
        "SELECT e.position, e.movement_id, e.account_id, e.currency, e.amount, e.created_at, m.kind, m.reference_id \
         FROM ledger_entries e JOIN movements m ON m.id = e.movement_id \
         WHERE e.account_id = $1 AND e.position > $2 ORDER BY e.position LIMIT $3",
    )
    .bind(account_id)
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *connection)
    .await?;
    rows.iter()
        .map(|row| {
            let currency = stored_currency(row)?;
            Ok(Entry {
                position: row.try_get("position")?,
                movement_id: row.try_get("movement_id")?,
                account_id: row.try_get("account_id")?,
                amount: Money::new(row.try_get("amount")?, currency),
                kind: MovementKind::parse(row.try_get("kind")?)?,
                reference_id: row.try_get("reference_id")?,
                created_at: row.try_get("created_at")?,
            })
        })
        .collect()
}

/// Records a movement: a debit entry, a credit entry, and the balance changes.
///
/// A debit of a non-negative account locks that account's row, folds its pending deltas
/// and subtracts; the database's CHECK refuses a negative result, reported as
/// [`Error::InsufficientFunds`]. Every other balance change is an inserted delta, so the
/// credited account's row is never locked (not even by a foreign-key check: the ledger
/// has none pointing at accounts; both accounts are read and checked here instead).
pub async fn post(connection: &mut PgConnection, movement: &Movement) -> Result<Posted, Error> {
    let currency = movement.amount.currency();
    let amount = movement.amount.amount_minor();
    if amount <= 0 {
        return Err(Error::Internal(
            "a movement amount must be positive".to_owned(),
        ));
    }
    let accounts = sqlx::query(
        "SELECT id, owner_id, currency, allow_negative FROM accounts WHERE id = ANY($1)",
    )
    .bind([
        movement.from_account_id.as_str(),
        movement.to_account_id.as_str(),
    ])
    .fetch_all(&mut *connection)
    .await?;
    let find = |id: &str| {
        accounts
            .iter()
            .find(|row| row.try_get::<String, _>("id").is_ok_and(|v| v == id))
    };
    let (Some(from), Some(to)) = (
        find(&movement.from_account_id),
        find(&movement.to_account_id),
    ) else {
        return Err(Error::NotFound("account"));
    };
    for account in [from, to] {
        let account_currency: String = account.try_get("currency")?;
        if account_currency != currency.code() {
            return Err(Error::CurrencyMismatch(format!(
                "account {} holds {account_currency}, the amount is {}",
                account.try_get::<String, _>("id")?,
                currency.code()
            )));
        }
    }

    let movement_id = new_id("mv");
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO movements (id, owner_id, kind, reference_id, currency, amount, debit_account_id, credit_account_id, description) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING created_at",
    )
    .bind(&movement_id)
    .bind(&movement.owner_id)
    .bind(movement.kind.as_str())
    .bind(&movement.reference_id)
    .bind(currency.code())
    .bind(amount)
    .bind(&movement.from_account_id)
    .bind(&movement.to_account_id)
    .bind(&movement.description)
    .fetch_one(&mut *connection)
    .await?;

    let from_allows_negative: bool = from.try_get("allow_negative")?;
    if !from_allows_negative {
        debit_checked(connection, &movement.from_account_id, amount).await?;
    }
    for (account, signed, with_delta) in [(from, -amount, from_allows_negative), (to, amount, true)]
    {
        let account_id: String = account.try_get("id")?;
        let owner_id: String = account.try_get("owner_id")?;
        let position: i64 = sqlx::query_scalar(
            "INSERT INTO ledger_entries (movement_id, account_id, owner_id, currency, amount) \
             VALUES ($1, $2, $3, $4, $5) RETURNING position",
        )
        .bind(&movement_id)
        .bind(&account_id)
        .bind(&owner_id)
        .bind(currency.code())
        .bind(signed)
        .fetch_one(&mut *connection)
        .await?;
        if with_delta {
            sqlx::query(
                "INSERT INTO balance_deltas (position, account_id, amount) VALUES ($1, $2, $3)",
            )
            .bind(position)
            .bind(&account_id)
            .bind(signed)
            .execute(&mut *connection)
            .await?;
        }
    }
    // Wakes balance streams on every replica once this commits.
    crate::notify::queue(connection, CHANNEL, "").await?;
    crate::metrics::ledger_posted(movement.kind, currency.code(), amount);
    Ok(Posted {
        movement_id,
        created_at,
    })
}

/// Folds the account's pending deltas into its balance and subtracts `amount`, under the
/// account row's lock; the CHECK constraint refuses a negative result.
async fn debit_checked(
    connection: &mut PgConnection,
    account_id: &str,
    amount: i64,
) -> Result<(), Error> {
    let result = sqlx::query(
        "WITH folded AS (DELETE FROM balance_deltas WHERE account_id = $1 RETURNING amount) \
         UPDATE accounts SET balance = balance + (SELECT coalesce(sum(amount), 0) FROM folded)::bigint - $2 \
         WHERE id = $1",
    )
    .bind(account_id)
    .bind(amount)
    .execute(&mut *connection)
    .await;
    match result {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(db))
            if db.code().as_deref() == Some(pg_code::CHECK_VIOLATION) =>
        {
            Err(Error::InsufficientFunds(account_id.to_owned()))
        }
        Err(err) => Err(err.into()),
    }
}
