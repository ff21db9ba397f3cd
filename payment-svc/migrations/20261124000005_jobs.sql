-- The durable job queue (DESIGN §4 "Background processing"): jobs are enqueued in the
-- same transaction as the state change that needs them, claimed with FOR UPDATE SKIP
-- LOCKED under a lease, and fenced: every claim bumps fencing_token, and a job's writes
-- require the token it was claimed with.
CREATE TABLE jobs (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind           text        NOT NULL CHECK (kind IN ('process_payment', 'resolve_unknown', 'resolve_refund', 'void_expired')),
    owner_id       text        NOT NULL,
    payment_id     text        NOT NULL,
    state          text        NOT NULL CHECK (state IN ('available', 'scheduled', 'executing', 'retryable', 'completed', 'cancelled', 'discarded', 'dead')),
    attempt        integer     NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts   integer     NOT NULL CHECK (max_attempts > 0),
    fencing_token  bigint      NOT NULL DEFAULT 0,
    locked_until   timestamptz,
    locked_by      text,
    last_error     text        NOT NULL DEFAULT '',
    schedule_at    timestamptz NOT NULL DEFAULT now(),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    CHECK ((state = 'executing') = (locked_until IS NOT NULL))
);

-- At most one live job per payment.
CREATE UNIQUE INDEX jobs_one_live_per_payment ON jobs (payment_id)
    WHERE state IN ('available', 'scheduled', 'executing', 'retryable');
-- What workers claim: due jobs, and executing ones whose lease ran out.
CREATE INDEX jobs_due ON jobs (schedule_at) WHERE state IN ('available', 'scheduled', 'retryable');
CREATE INDEX jobs_leased ON jobs (locked_until) WHERE state = 'executing';
CREATE INDEX jobs_by_state ON jobs (state, id);
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
