//! `payment-svc rotate-card-keys`: re-encrypts every vaulted card that is not under the
//! active key (`CARD_ENCRYPTION_ACTIVE_KEY`) with a fresh nonce, in batches.
//!
//! Each batch is one transaction over rows locked with `FOR UPDATE SKIP LOCKED` and taken
//! in id order from a cursor, so it runs beside serving replicas, can be interrupted and
//! run again, and never loops on a row it cannot open (such rows are counted and named,
//! never their contents). Old keys stay configured until the command reports 0 remaining.

use sqlx::{PgPool, Row};

use crate::error::Error;
use crate::vault::{Sealed, Vault};

/// What a rotation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// The key every rotated row is now under.
    pub active_key: String,
    /// Rows re-encrypted.
    pub rotated: u64,
    /// Rows that did not open (unknown key id or failed authentication), by id.
    pub unreadable: Vec<String>,
    /// Rows under another key after the run (locked by a concurrent run, or unreadable).
    pub remaining: u64,
}

/// Re-encrypts every card not under the vault's active key, `batch_size` rows per
/// transaction.
pub async fn rotate_card_keys(
    pool: &PgPool,
    vault: &Vault,
    batch_size: i64,
) -> Result<RotationReport, Error> {
    let active = vault.active_key_id().to_owned();
    let mut report = RotationReport {
        active_key: active.clone(),
        ..RotationReport::default()
    };
    let mut cursor = String::new();
    loop {
        let mut transaction = pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, key_id, nonce, ciphertext FROM cards WHERE key_id <> $1 AND id > $2 \
             ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED",
        )
        .bind(&active)
        .bind(&cursor)
        .bind(batch_size)
        .fetch_all(&mut *transaction)
        .await?;
        let Some(last) = rows.last() else {
            break;
        };
        cursor = last.try_get("id")?;
        for row in &rows {
            let id: String = row.try_get("id")?;
            let sealed = Sealed {
                key_id: row.try_get("key_id")?,
                nonce: row.try_get("nonce")?,
                ciphertext: row.try_get("ciphertext")?,
            };
            let pan = match vault.open(&id, &sealed) {
                Ok(pan) => pan,
                Err(err) => {
                    tracing::error!(card_id = %id, key_id = %sealed.key_id, error = %err, "card does not open");
                    report.unreadable.push(id);
                    continue;
                }
            };
            let resealed = vault
                .seal(&id, &pan)
                .map_err(|err| Error::Internal(err.to_string()))?;
            sqlx::query("UPDATE cards SET key_id = $2, nonce = $3, ciphertext = $4 WHERE id = $1")
                .bind(&id)
                .bind(&resealed.key_id)
                .bind(&resealed.nonce)
                .bind(&resealed.ciphertext)
                .execute(&mut *transaction)
                .await?;
            report.rotated += 1;
        }
        transaction.commit().await?;
        tracing::info!(rotated = report.rotated, "card batch re-encrypted");
    }
    let remaining: i64 = sqlx::query_scalar("SELECT count(*) FROM cards WHERE key_id <> $1")
        .bind(&active)
        .fetch_one(pool)
        .await?;
    report.remaining = u64::try_from(remaining).unwrap_or(0);
    Ok(report)
}
