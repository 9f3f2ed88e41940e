-- Issue 14: the outbox in the job store, written in the same transaction as the job change that
-- causes it (webhook deliveries with their attempts, and the Convex mirror's newest state of each
-- job). Several instances send it: a sender claims due rows with FOR UPDATE SKIP LOCKED and a
-- lease (claimed_by, claim_expires), so two instances never send the same row at once and a
-- killed sender's claim expires. The columns are those of SQLite's outbox (migration 1 and 6).

CREATE TABLE webhook_deliveries (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- order of a (job, receiver)'s events
    id text NOT NULL UNIQUE,  -- the webhook-id header: the same on every retry
    job_id text NOT NULL,
    url text NOT NULL,
    event text NOT NULL,
    body text NOT NULL,
    created_at double precision NOT NULL,
    next_attempt_at double precision NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    state text NOT NULL DEFAULT 'pending',  -- pending|delivered|failed|stopped|superseded
    last_status integer,
    last_error text,
    finished_at double precision,
    claimed_by text,
    claim_expires double precision
);
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (job_id, url, seq) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id, seq);
CREATE INDEX webhook_deliveries_finished ON webhook_deliveries (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE webhook_attempts (
    delivery_id text NOT NULL,
    attempt integer NOT NULL,
    at double precision NOT NULL,
    status integer,
    error text,
    duration_ms double precision NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);

CREATE TABLE convex_updates (
    job_id text PRIMARY KEY,
    path text NOT NULL,
    args text NOT NULL,
    version bigint NOT NULL,
    sent_version bigint NOT NULL DEFAULT 0,
    updated_at double precision NOT NULL,
    next_attempt_at double precision NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    claimed_by text,
    claim_expires double precision
);
CREATE INDEX convex_updates_due ON convex_updates (next_attempt_at) WHERE version > sent_version;
