-- 042_reports_dismissed.sql: a report the operator dismissed.
--
-- Since the fortieth session an operator may dismiss a report (POST
-- /admin/v1/reports/{id}/dismiss): handled, and judged unfounded.  A
-- dismissed report no longer counts toward the automatic limit's
-- threshold (docs/policy.md, "Reports"); before, every report in the
-- window counted, dismissed or not, as there was no way to say so.
ALTER TABLE reports ADD COLUMN IF NOT EXISTS dismissed boolean NOT NULL DEFAULT false;
ALTER TABLE reports DROP CONSTRAINT IF EXISTS reports_dismissed_check;
ALTER TABLE reports ADD CONSTRAINT reports_dismissed_check CHECK (NOT dismissed OR handled_at IS NOT NULL);
COMMENT ON COLUMN reports.dismissed IS 'The operator dismissed the report (handled, judged unfounded): it does not count toward the automatic limit.';
