-- The payment events outbox: one row per state change, written in the same transaction.
-- xid is the writing transaction's id: streams deliver only events of transactions older
-- than their snapshot's xmin, in (xid, id) order, so an event whose transaction commits
-- late is never skipped. The row holds what changed (status, amounts, failure) as it
-- was right after the change; the rest of a payment or refund never changes.
CREATE TABLE payment_events (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xid             xid8        NOT NULL DEFAULT pg_current_xact_id(),
    owner_id        text        NOT NULL,
    type            text        NOT NULL,
    payment_id      text        NOT NULL REFERENCES payments (id),
    refund_id       text        REFERENCES refunds (id),
    status          text        NOT NULL,
    amount_captured bigint      NOT NULL,
    amount_refunded bigint      NOT NULL,
    failure_code    text        NOT NULL DEFAULT '',
    failure_message text        NOT NULL DEFAULT '',
    changed_at      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX payment_events_by_owner ON payment_events (owner_id, xid, id);

CREATE TRIGGER payment_events_append_only BEFORE UPDATE OR DELETE ON payment_events
    FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();
CREATE TRIGGER payment_events_no_truncate BEFORE TRUNCATE ON payment_events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_ledger_change();
