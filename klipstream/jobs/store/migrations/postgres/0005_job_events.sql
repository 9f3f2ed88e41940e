-- Issue 14: the events of every job's event stream, written in the same transaction as the job
-- change that causes them (with a NOTIFY "job_id:seq" that wakes every instance's streams). seq
-- is the job's own sequence and the SSE event id: the same on every instance, so a stream
-- reopened with Last-Event-ID anywhere is replayed from here. Bounded per job
-- (KLIPSTREAM_STREAM_EVENTS_KEPT; older rows are trimmed by key range as the sequence grows) and
-- deleted with the job by the janitor.
CREATE TABLE job_events (
    job_id text NOT NULL,
    seq bigint NOT NULL,
    type text NOT NULL,
    data text NOT NULL,
    created_at double precision NOT NULL,
    PRIMARY KEY (job_id, seq)
);
