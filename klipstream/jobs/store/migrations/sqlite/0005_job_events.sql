-- Issue 14: the events of every job's event stream, written in the same transaction as the job
-- change that causes them. seq is the job's own sequence and the SSE event id, so a stream
-- reopened with Last-Event-ID (after a restart, or on another instance) is replayed from here.
-- Bounded per job (KLIPSTREAM_STREAM_EVENTS_KEPT; older rows are trimmed by key range as the
-- sequence grows) and deleted with the job by the janitor.
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
