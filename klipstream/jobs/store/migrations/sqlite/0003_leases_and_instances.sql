-- Issue 14, phase 2: the columns and table PostgreSQL's migration 3 adds for several instances
-- (leases, fencing, heartbeats). One SQLite file has one instance, which claims from memory; the
-- columns are mirrored so both backends keep one schema version and one row shape.

ALTER TABLE jobs ADD COLUMN enqueued_at REAL;
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_token INTEGER;
ALTER TABLE jobs ADD COLUMN lease_expires_at REAL;
ALTER TABLE jobs ADD COLUMN lease_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    running INTEGER NOT NULL DEFAULT 0,
    max_running INTEGER NOT NULL DEFAULT 0
);
