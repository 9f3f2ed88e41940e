-- The job store's tables, as in SQLite's version 1 (klipstream/jobs/store/postgres.py). Times are
-- seconds since the epoch (double precision), as the store's rows carry them. The webhook outbox
-- stays in the local SQLite file until it moves here (docs/decisions.md, "PostgreSQL: phase 2").

CREATE TABLE jobs (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- insertion order: the list cursor
    job_id text NOT NULL UNIQUE,
    video_id text NOT NULL,
    status text NOT NULL,
    priority text NOT NULL,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL,
    finished_at double precision,
    doc text NOT NULL  -- the whole job as JSON; the columns above are what the store filters on
);
CREATE INDEX jobs_status ON jobs (status, seq);
CREATE INDEX jobs_finished_at ON jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE idempotency (
    key text PRIMARY KEY,
    body_hash text NOT NULL,
    job_id text NOT NULL,
    response text NOT NULL,
    status integer NOT NULL,
    created_at double precision NOT NULL
);

CREATE TABLE stage_runs (
    stage text NOT NULL,
    seconds double precision NOT NULL,
    media_seconds double precision,
    finished_at double precision NOT NULL
);
CREATE INDEX stage_runs_time ON stage_runs (stage, finished_at);
