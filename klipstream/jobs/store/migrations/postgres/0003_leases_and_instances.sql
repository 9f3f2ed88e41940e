-- Issue 14, phase 2: several instances claim jobs from this table.
-- enqueued_at: when the job (re-)entered the queue, for ageing from a stored time (not a process
-- clock). A claim gives the job a lease: its owner (an instance id), a token (fencing: every write
-- of the runner names it, and a write with a stale token is refused) and an expiry that the
-- owner's heartbeats push forward; an instance's reaper re-queues jobs whose lease expired.
-- cancel_requested: a cancel made on an instance that does not run the job, read by the owner's
-- heartbeat. A row written by older code has no enqueued_at: its created_at stands in.

ALTER TABLE jobs ADD COLUMN enqueued_at double precision;
UPDATE jobs SET enqueued_at = created_at;
ALTER TABLE jobs ADD COLUMN lease_owner text;
ALTER TABLE jobs ADD COLUMN lease_token bigint;
ALTER TABLE jobs ADD COLUMN lease_expires_at double precision;
ALTER TABLE jobs ADD COLUMN lease_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false;
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE status = 'running';
CREATE SEQUENCE lease_tokens;

-- A write of a leased job sets lease_token to this function of it: the same token when the writer
-- holds the lease, else an error (SQLSTATE KS001) that the store turns into LeaseLost.
CREATE FUNCTION klipstream_fence(job text, held bigint, claimed bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    IF held IS DISTINCT FROM claimed THEN
        RAISE EXCEPTION 'the lease of job % was lost (token %, now %)', job, claimed, held
            USING ERRCODE = 'KS001';
    END IF;
    RETURN held;
END
$$;

CREATE TABLE instances (
    id text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    started_at double precision NOT NULL,
    heartbeat_at double precision NOT NULL,
    running integer NOT NULL DEFAULT 0,
    max_running integer NOT NULL DEFAULT 0
);
