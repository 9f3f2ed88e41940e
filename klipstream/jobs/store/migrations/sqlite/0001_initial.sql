-- The schema as it was before versioned migrations: the job store (klipstream/jobs/store/sqlite.py)
-- and the webhook outbox (klipstream/integrations/outbox.py). Every statement is idempotent, so a
-- database created by an earlier version is brought to version 1 as it is, with its rows.

CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,  -- insertion order; rows are never deleted, so never reused
    job_id TEXT NOT NULL UNIQUE,
    video_id TEXT NOT NULL,
    status TEXT NOT NULL,
    priority TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
-- Only finished jobs are counted by time, so queued ones stay out of this index.
DROP INDEX IF EXISTS jobs_finished;
CREATE INDEX IF NOT EXISTS jobs_finished_at ON jobs (finished_at) WHERE finished_at IS NOT NULL;
DROP INDEX IF EXISTS jobs_video;  -- deduplication is answered from memory
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    body_hash TEXT NOT NULL,
    job_id TEXT NOT NULL,
    response TEXT NOT NULL,
    status INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS stage_runs (
    stage TEXT NOT NULL,
    seconds REAL NOT NULL,
    media_seconds REAL,
    finished_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS stage_runs_time ON stage_runs (stage, finished_at);

CREATE TABLE IF NOT EXISTS webhook_deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,            -- the webhook-id header: the same on every retry
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    event TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending', -- pending|delivered|failed|stopped|superseded
    last_status INTEGER,
    last_error TEXT,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS webhook_deliveries_job ON webhook_deliveries(job_id, seq);
CREATE TABLE IF NOT EXISTS webhook_attempts (
    delivery_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at REAL NOT NULL,
    status INTEGER,
    error TEXT,
    duration_ms REAL NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
CREATE TABLE IF NOT EXISTS webhook_stopped_jobs (
    job_id TEXT PRIMARY KEY,
    at REAL NOT NULL,
    reason TEXT NOT NULL
);
