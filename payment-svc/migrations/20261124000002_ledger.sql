-- Accounts and the double-entry, append-only ledger.
--
-- Every movement of money is a row in `movements` and exactly two rows in
-- `ledger_entries` (a debit and a credit of the same amount), so per currency the sum of
-- all entries — and of all balances — is zero. Every table carries `owner_id`, the
-- future distribution key (DESIGN §4, growth path).
--
-- Balances: `accounts.balance` plus the account's rows in `balance_deltas`.
--   * A debit of a non-negative account locks the account row, folds its pending deltas
--     into `balance`, and subtracts: the CHECK on `accounts` refuses a negative result,
--     so the database itself enforces non-negative accounts.
--   * Every other change (credits; debits of accounts allowed to go negative, such as
--     the system accounts) only INSERTs a delta: it never locks the account row, so many
--     payments into one hot merchant do not serialize.
--   Deltas are non-negative for non-negative accounts, so the true balance of such an
--   account is always >= `balance` >= 0.
--
-- No foreign key points at `accounts` from the ledger: a foreign-key check takes a KEY
-- SHARE lock on the referenced row, and credits must not lock the receiving account at
-- all. The ledger code reads both accounts (existence, currency) in the movement's
-- transaction instead, and accounts can be neither deleted (no privilege) nor changed in
-- identity, owner, currency or kind (the trigger below).

CREATE TABLE accounts (
    id             text        PRIMARY KEY,
    owner_id       text        NOT NULL,
    currency       text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    kind           text        NOT NULL CHECK (kind IN ('customer', 'merchant', 'system')),
    allow_negative boolean     NOT NULL,
    display_name   text        NOT NULL DEFAULT '',
    labels         jsonb       NOT NULL DEFAULT '{}',
    -- Set only for system accounts: e.g. 'acquirer_settlement:BRL'.
    system_key     text        UNIQUE,
    balance        bigint      NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT accounts_non_negative CHECK (allow_negative OR balance >= 0),
    CONSTRAINT accounts_system_key CHECK ((kind = 'system') = (system_key IS NOT NULL))
);

CREATE INDEX accounts_by_owner ON accounts (owner_id, created_at DESC, id DESC);

-- Only an account's balance changes; what it is never does.
CREATE FUNCTION refuse_account_identity_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.id, NEW.owner_id, NEW.currency, NEW.kind, NEW.allow_negative, NEW.system_key)
       IS DISTINCT FROM (OLD.id, OLD.owner_id, OLD.currency, OLD.kind, OLD.allow_negative, OLD.system_key) THEN
        RAISE EXCEPTION 'accounts: only the balance may change' USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER accounts_identity_fixed BEFORE UPDATE ON accounts
    FOR EACH ROW EXECUTE FUNCTION refuse_account_identity_change();

CREATE TABLE movements (
    id                text        PRIMARY KEY,
    owner_id          text        NOT NULL,  -- the principal that caused the movement
    kind              text        NOT NULL CHECK (kind IN ('capture', 'refund_hold', 'refund_settle', 'refund_reverse', 'transfer')),
    reference_id      text        NOT NULL,  -- payment, refund or transfer id
    currency          text        NOT NULL,
    amount            bigint      NOT NULL CHECK (amount > 0),
    debit_account_id  text        NOT NULL,
    credit_account_id text        NOT NULL,
    description       text        NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (debit_account_id <> credit_account_id)
);

CREATE INDEX movements_by_reference ON movements (reference_id);

CREATE TABLE ledger_entries (
    position     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    movement_id  text        NOT NULL REFERENCES movements (id),
    account_id   text        NOT NULL,
    owner_id     text        NOT NULL,  -- the account's owner
    currency     text        NOT NULL,
    amount       bigint      NOT NULL CHECK (amount <> 0),  -- negative: debit
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ledger_entries_by_account ON ledger_entries (account_id, position);
CREATE INDEX ledger_entries_by_movement ON ledger_entries (movement_id);

CREATE TABLE balance_deltas (
    position    bigint PRIMARY KEY REFERENCES ledger_entries (position),
    account_id  text   NOT NULL,
    amount      bigint NOT NULL CHECK (amount <> 0)
);

CREATE INDEX balance_deltas_by_account ON balance_deltas (account_id);

-- Ledger entries and movements are immutable.
CREATE FUNCTION refuse_ledger_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_ledger_change();
CREATE TRIGGER movements_append_only BEFORE UPDATE OR DELETE ON movements
    FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();
CREATE TRIGGER movements_no_truncate BEFORE TRUNCATE ON movements
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_ledger_change();

-- At commit, every movement's entries must sum to zero: a half-written movement can
-- never commit, whatever the code above the database does.
CREATE FUNCTION check_movement_balanced() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    total bigint;
    entries int;
BEGIN
    SELECT coalesce(sum(amount), 0), count(*) INTO total, entries
      FROM ledger_entries WHERE movement_id = NEW.movement_id;
    IF total <> 0 OR entries <> 2 THEN
        RAISE EXCEPTION 'movement % is unbalanced (% entries, sum %)', NEW.movement_id, entries, total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER ledger_entries_balanced
    AFTER INSERT ON ledger_entries
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION check_movement_balanced();

-- Idempotency keys (DESIGN §4): scope (owner, method, key); the request's fingerprint;
-- the stored response, replayed byte for byte. Rows are kept for the retention period
-- and then reaped.
CREATE TABLE idempotency_keys (
    owner_id       text        NOT NULL,
    method         text        NOT NULL,
    key            text        NOT NULL,
    fingerprint    bytea       NOT NULL,
    -- 'started' → … recovery points … → 'finished'
    recovery_point text        NOT NULL DEFAULT 'started',
    locked_until   timestamptz,
    response_code  int,
    response_body  bytea,
    -- For stored refusals: the google.rpc.Status details (grpc-status-details-bin).
    response_details bytea,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner_id, method, key),
    CHECK ((recovery_point = 'finished') = (response_code IS NOT NULL))
);

CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
