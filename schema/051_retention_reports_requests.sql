-- 051_retention_reports_requests.sql: the retention sweep's deletion of
-- handled reports (retention.reports_days) and of consent requests
-- answered or expired (retention.consent_requests_days), gateway/
-- retention.c, reports_sql and requests_sql.
--
-- Until the forty-ninth session both were kept for ever: every report
-- (a peer or a user can file many; a comment of up to 8 KB each) and
-- every consent request, whatever became of it.  Each index holds the
-- rows the sweep may delete, in the order it deletes them, so that a
-- run reads the old ones alone, never the open reports or the pending
-- requests: reports by when they were handled; requests by when they
-- stopped being pending (answered: decided_at; expired: decided_at
-- since this session, before it only expires_at).  Their cost on the
-- insert path: none (a row enters when it is handled, or decided).
--
-- The build reads the whole table and blocks its writers while it runs;
-- both tables are small next to events (operations.md): on a large one
-- build it first with CREATE INDEX CONCURRENTLY under this name, and this
-- file then builds nothing.
CREATE INDEX IF NOT EXISTS reports_handled_idx ON reports (handled_at)
    WHERE handled_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS consent_requests_closed_idx ON consent_requests ((coalesce(decided_at, expires_at)))
    WHERE state <> 'pending';
