-- Card payments: the vault, payments, and acquirer attempts.

-- PANs only encrypted (AES-256-GCM, per-row nonce, row id as associated data, key id per
-- row); fingerprint, last4 and brand in clear. The CVC is never stored.
CREATE TABLE cards (
    id          text        PRIMARY KEY,
    owner_id    text        NOT NULL,
    key_id      text        NOT NULL,
    nonce       bytea       NOT NULL CHECK (length(nonce) = 12),
    ciphertext  bytea       NOT NULL,
    fingerprint bytea       NOT NULL,
    last4       text        NOT NULL CHECK (last4 ~ '^[0-9]{4}$'),
    brand       text        NOT NULL,
    exp_month   smallint    NOT NULL CHECK (exp_month BETWEEN 1 AND 12),
    exp_year    smallint    NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX cards_by_key ON cards (key_id);

CREATE TABLE payments (
    id                  text        PRIMARY KEY,
    owner_id            text        NOT NULL,
    merchant_account_id text        NOT NULL,
    currency            text        NOT NULL,
    amount              bigint      NOT NULL CHECK (amount > 0),
    amount_captured     bigint      NOT NULL DEFAULT 0,
    amount_refunded     bigint      NOT NULL DEFAULT 0,
    status              text        NOT NULL CHECK (status IN ('pending', 'processing', 'requires_capture', 'succeeded', 'failed', 'canceled')),
    capture_method      text        NOT NULL CHECK (capture_method IN ('automatic', 'manual')),
    mode                text        NOT NULL CHECK (mode IN ('sync', 'async')),
    card_id             text        NOT NULL REFERENCES cards (id),
    -- The approved authorization attempt, once there is one.
    authorization_id    text,
    failure_code        text        NOT NULL DEFAULT '',
    failure_message     text        NOT NULL DEFAULT '',
    description         text        NOT NULL DEFAULT '',
    metadata            jsonb       NOT NULL DEFAULT '{}',
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- No foreign key to accounts (see the ledger migration): the merchant account is
    -- checked in the creating transaction, and a hot merchant's row is never locked.
    CHECK (amount_captured BETWEEN 0 AND amount),
    CHECK (amount_refunded BETWEEN 0 AND amount_captured)
);

CREATE INDEX payments_by_owner ON payments (owner_id, created_at DESC, id DESC);
CREATE INDEX payments_by_owner_status ON payments (owner_id, status, created_at DESC, id DESC);

-- One row per acquirer call, written BEFORE the call; its id is the acquirer's
-- idempotency key (operation id), so a retry can never charge twice.
CREATE TABLE attempts (
    id          text        PRIMARY KEY,
    owner_id    text        NOT NULL,
    payment_id  text        NOT NULL REFERENCES payments (id),
    kind        text        NOT NULL CHECK (kind IN ('authorize', 'capture', 'void', 'refund')),
    currency    text        NOT NULL,
    amount      bigint      NOT NULL CHECK (amount > 0),
    -- pending: written, not answered; unknown: no answer in time (may have happened).
    status      text        NOT NULL CHECK (status IN ('pending', 'approved', 'declined', 'failed', 'unknown')),
    result_code text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX attempts_by_payment ON attempts (payment_id, created_at);

-- Multi-phase requests remember what they created.
ALTER TABLE idempotency_keys ADD COLUMN payment_id text;
