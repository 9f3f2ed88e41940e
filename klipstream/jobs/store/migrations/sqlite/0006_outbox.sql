-- Issue 14: the outbox is written by the job store's writer, in the same transaction as the job
-- change that causes it (klipstream/jobs/store/sqlite.py). The webhook tables are those of
-- version 1 (the old klipstream/integrations/outbox.py wrote them in this file with a connection
-- of its own): pending rows of an upgraded file are simply sent by the new sender. A claim
-- (claimed_by, claim_expires) marks a delivery being sent, as on PostgreSQL; one SQLite file has
-- one instance, which clears stale claims when it opens the file.

ALTER TABLE webhook_deliveries ADD COLUMN claimed_by TEXT;
ALTER TABLE webhook_deliveries ADD COLUMN claim_expires REAL;
-- The oldest pending delivery of each (job, receiver) is the only one that is due.
CREATE INDEX IF NOT EXISTS webhook_deliveries_pending ON webhook_deliveries (job_id, url, seq) WHERE state = 'pending';

-- The Convex mirror: the newest state of each job (a mutation and its arguments), and the version
-- of it that was sent. A job whose version is ahead of sent_version is due.
CREATE TABLE IF NOT EXISTS convex_updates (
    job_id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    args TEXT NOT NULL,
    version INTEGER NOT NULL,
    sent_version INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    claimed_by TEXT,
    claim_expires REAL
);
CREATE INDEX IF NOT EXISTS convex_updates_due ON convex_updates (next_attempt_at) WHERE version > sent_version;
