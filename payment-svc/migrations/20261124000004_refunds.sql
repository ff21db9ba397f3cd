-- Refunds, and what capture, void and refund attempts apply to.

-- A refund is its own object: PENDING (the amount is held from the merchant in
-- refunds_pending) → SUCCEEDED (the hold settles to the acquirer) | FAILED (the hold goes
-- back to the merchant).
CREATE TABLE refunds (
    id              text        PRIMARY KEY,
    owner_id        text        NOT NULL,
    payment_id      text        NOT NULL REFERENCES payments (id),
    currency        text        NOT NULL,
    amount          bigint      NOT NULL CHECK (amount > 0),
    status          text        NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    reason          text        NOT NULL DEFAULT '',
    failure_code    text        NOT NULL DEFAULT '',
    failure_message text        NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX refunds_by_payment ON refunds (payment_id, created_at);

-- The acquirer operation an attempt applies to (capture and void: the authorization;
-- refund: the capture), and the refund a refund attempt carries out.
ALTER TABLE attempts ADD COLUMN parent_id text;
ALTER TABLE attempts ADD COLUMN refund_id text REFERENCES refunds (id);

-- Multi-phase requests remember what they created: a payment (CreatePayment) or an
-- attempt (CapturePayment, CancelPayment, RefundPayment).
ALTER TABLE idempotency_keys RENAME COLUMN payment_id TO resource_id;
