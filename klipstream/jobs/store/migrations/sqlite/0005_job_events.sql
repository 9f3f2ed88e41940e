-- Reserved for branch `events` (job_events, issue 14), which replaces this file at the merge:
-- migrations are numbered without gaps, and the outbox is 0006 (notes: effects contract).
SELECT 1;
