//! The audit trail: one append-only row per state change, written in the same
//! transaction as the change (the table refuses UPDATE, DELETE and TRUNCATE).

use serde_json::Value;
use sqlx::PgConnection;

use crate::error::Error;

/// One audited change. `before`/`after` never contain card data.
#[derive(Debug, Clone)]
pub struct AuditEvent<'a> {
    /// The tenant owning the entity.
    pub owner_id: &'a str,
    /// Who acted.
    pub principal: &'a str,
    /// What was done, e.g. `transfer.create`.
    pub action: &'a str,
    /// The kind of entity.
    pub entity_type: &'a str,
    /// The entity's id.
    pub entity_id: &'a str,
    /// The entity before the change.
    pub before: Option<Value>,
    /// The entity after the change.
    pub after: Option<Value>,
    /// The request that caused it.
    pub request_id: &'a str,
}

/// Writes the audit row in the caller's transaction.
pub async fn record(connection: &mut PgConnection, event: AuditEvent<'_>) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO audit_log (owner_id, principal, action, entity_type, entity_id, before, after, request_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(event.owner_id)
    .bind(event.principal)
    .bind(event.action)
    .bind(event.entity_type)
    .bind(event.entity_id)
    .bind(event.before.map(sqlx::types::Json))
    .bind(event.after.map(sqlx::types::Json))
    .bind(event.request_id)
    .execute(connection)
    .await?;
    Ok(())
}
