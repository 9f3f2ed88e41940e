-- Issue 14: a forced submission's row has dedup_key '' (as in PostgreSQL's migration 4, which
-- also makes the key unique over active jobs). One SQLite file has one process, which decides
-- deduplication in memory, so no unique index here: the version stays in step with PostgreSQL's.

UPDATE jobs SET dedup_key = '' WHERE dedup_key <> '' AND json_extract(doc, '$.options.force') = 1;
