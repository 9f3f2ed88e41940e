-- Issue 13 (hardening): the deduplication key of a job (video id plus a digest of the options that
-- change its results) and the owner of an idempotency key (a hash of the API key that made it).
-- A file written by the hardening release before versioned migrations already has both columns:
-- upgrade_sqlite() skips an ADD COLUMN whose column exists, so such a file upgrades as it is.

ALTER TABLE jobs ADD COLUMN dedup_key TEXT NOT NULL DEFAULT '';
ALTER TABLE idempotency ADD COLUMN owner TEXT NOT NULL DEFAULT '';
-- The deduplication key of active jobs.
CREATE INDEX IF NOT EXISTS jobs_dedup_active ON jobs (dedup_key) WHERE status IN ('queued', 'running');
-- The janitor deletes idempotency records and finished webhook deliveries by age.
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created_at);
CREATE INDEX IF NOT EXISTS webhook_deliveries_finished ON webhook_deliveries (finished_at) WHERE finished_at IS NOT NULL;
