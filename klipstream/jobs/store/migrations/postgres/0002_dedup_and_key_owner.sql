-- Issue 13 (hardening): the deduplication key of a job (video id plus a digest of the options that
-- change its results) and the owner of an idempotency key (a hash of the API key that made it).

ALTER TABLE jobs ADD COLUMN dedup_key text NOT NULL DEFAULT '';
ALTER TABLE idempotency ADD COLUMN owner text NOT NULL DEFAULT '';
CREATE INDEX jobs_dedup_active ON jobs (dedup_key) WHERE status IN ('queued', 'running');
CREATE INDEX idempotency_created ON idempotency (created_at);
