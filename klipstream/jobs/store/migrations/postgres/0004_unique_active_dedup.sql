-- Issue 14: deduplication across instances is the database's. A forced submission (options.force)
-- shares no job, so its row's dedup_key is '' (the JSON keeps the key); then at most one active
-- job may hold each non-empty key. Rows written before: forced jobs get '', and of any other
-- active jobs sharing a key all but the oldest do (they stay as they are, only unshared).

UPDATE jobs SET dedup_key = '' WHERE dedup_key <> '' AND (doc::jsonb #>> '{options,force}') = 'true';
UPDATE jobs SET dedup_key = ''
WHERE status IN ('queued', 'running') AND dedup_key <> '' AND seq NOT IN (
    SELECT min(seq) FROM jobs WHERE status IN ('queued', 'running') AND dedup_key <> '' GROUP BY dedup_key
);
CREATE UNIQUE INDEX jobs_dedup_unique ON jobs (dedup_key) WHERE status IN ('queued', 'running') AND dedup_key <> '';

-- A queued job's place in line: for each priority lane, the queued jobs that entered early enough
-- to be ahead (klipstream.queue's rule), one index range per lane instead of a scan of the queue.
CREATE INDEX jobs_queued_lanes ON jobs (priority, (COALESCE(enqueued_at, created_at))) WHERE status = 'queued';
