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

/// One stored audit row.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// Position in the trail.
    pub id: i64,
    /// Who acted.
    pub principal: String,
    /// What was done.
    pub action: String,
    /// The kind of entity.
    pub entity_type: String,
    /// The entity.
    pub entity_id: String,
    /// Before the change.
    pub before: Option<Value>,
    /// After the change.
    pub after: Option<Value>,
    /// The request.
    pub request_id: String,
    /// The trace, when tracing was on.
    pub trace_id: Option<String>,
    /// When.
    pub occurred_at: chrono::DateTime<chrono::Utc>,
}

/// A page of the trail, oldest first, optionally of one entity type and id.
pub async fn list(
    connection: &mut PgConnection,
    entity_type: Option<&str>,
    entity_id: Option<&str>,
    after: i64,
    limit: i64,
) -> Result<Vec<AuditRecord>, Error> {
    use sqlx::Row as _;
    let rows = sqlx::query(
        "SELECT id, principal, action, entity_type, entity_id, before, after, request_id, trace_id, occurred_at \
         FROM audit_log WHERE ($1::text IS NULL OR entity_type = $1) AND ($2::text IS NULL OR entity_id = $2) \
         AND id > $3 ORDER BY id LIMIT $4",
    )
    .bind(entity_type)
    .bind(entity_id)
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *connection)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(AuditRecord {
                id: row.try_get("id")?,
                principal: row.try_get("principal")?,
                action: row.try_get("action")?,
                entity_type: row.try_get("entity_type")?,
                entity_id: row.try_get("entity_id")?,
                before: row
                    .try_get::<Option<sqlx::types::Json<Value>>, _>("before")?
                    .map(|j| j.0),
                after: row
                    .try_get::<Option<sqlx::types::Json<Value>>, _>("after")?
                    .map(|j| j.0),
                request_id: row.try_get("request_id")?,
                trace_id: row.try_get("trace_id")?,
                occurred_at: row.try_get("occurred_at")?,
            })
        })
        .collect()
}
