-- Issue 14 (operations): the cluster-wide bounds, decided by the database inside the statement
-- that claims or queues a job, so that one round trip stays one round trip and the lock that
-- makes the decision atomic is held only while the server works, never across the network.
--
-- Each function takes a transaction-scoped advisory lock, then counts with a snapshot of its own
-- (a VOLATILE function's queries see every commit made before they run, READ COMMITTED): every
-- claim, or every transaction adding to the queue, counts what the previous holder committed.

-- KLIPSTREAM_CLUSTER_MAX_RUNNING_JOBS: true while fewer than max_running jobs run, cluster-wide.
-- The claim (klipstream/jobs/store/postgres.py) calls it once, for the job it has chosen and locked.
CREATE FUNCTION klipstream_running_below(max_running integer) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1802269301);  -- "klru"
    RETURN (SELECT count(*) FROM jobs WHERE status = 'running') < max_running;
END
$$;

-- KLIPSTREAM_MAX_QUEUED_JOBS: admits one more queued job or raises KS002 (the store's QueueFull,
-- a 429). Called once per new or retried job. The first call of a transaction takes the lock and
-- works out a lower bound of the room left cheaply: every queued job's seq lies between the oldest
-- queued job's and the newest row's (two index probes); only when that leaves no room are the
-- queued jobs counted, and no further than the limit. Later calls of the transaction spend that
-- room (kept in a transaction-local setting), so a batch of new jobs costs one probe, not one each.
-- Jobs returning to the queue without a new admission (an expired lease, a shutdown) do not take
-- the lock: they were admitted once already.
CREATE FUNCTION klipstream_queue_admit(max_queued integer) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    room bigint := NULLIF(current_setting('klipstream.queue_room', true), '')::bigint;
BEGIN
    IF max_queued IS NULL THEN
        RETURN true;
    END IF;
    IF room IS NULL OR room < 1 THEN
        PERFORM pg_advisory_xact_lock(1802269045);  -- "klqu"
        room := max_queued - COALESCE(
            (SELECT max(seq) FROM jobs) - (SELECT min(seq) FROM jobs WHERE status = 'queued') + 1, 0);
        IF room < 1 THEN
            room := max_queued - (SELECT count(*) FROM (
                SELECT 1 FROM jobs WHERE status = 'queued' LIMIT max_queued) AS queued);
        END IF;
        IF room < 1 THEN
            PERFORM set_config('klipstream.queue_room', '', true);
            RAISE EXCEPTION 'the queue holds its maximum of % jobs', max_queued USING ERRCODE = 'KS002';
        END IF;
    END IF;
    PERFORM set_config('klipstream.queue_room', (room - 1)::text, true);
    RETURN true;
END
$$;
