-- The audit trail: who did what, when, to which entity. Append-only: rows are written in
-- the same transaction as the state change they describe and can never be changed.
CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id    text        NOT NULL,              -- tenant that owns the entity (distribution key)
    principal   text        NOT NULL,              -- who acted
    action      text        NOT NULL,              -- e.g. payment.capture
    entity_type text        NOT NULL,
    entity_id   text        NOT NULL,
    before      jsonb,                             -- never contains card data
    after       jsonb,
    request_id  text        NOT NULL,
    trace_id    text,
    occurred_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX audit_log_entity ON audit_log (entity_type, entity_id, id);
CREATE INDEX audit_log_owner ON audit_log (owner_id, id);

-- Privileges alone do not stop an owner or superuser, so the table refuses changes itself.
CREATE FUNCTION refuse_audit_log_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_log_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION refuse_audit_log_change();

CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_audit_log_change();
