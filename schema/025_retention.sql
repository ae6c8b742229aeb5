-- 025_retention.sql: the indexes of the retention sweep (gateway/retention.c).
--
-- Old content is erased, old delivery attempts deleted, a bounded batch at
-- a time, oldest first.  Each statement must find its rows without reading
-- the table's bulk, which after months of operation is everything already
-- done:
--
-- events: only the events whose content is still there, by acceptance
-- time.  An erased event leaves this index (the brin index on accepted_at,
-- schema/004, would hand back every old page, erased or not, on every
-- run).  What the sweep reads is the events due and those kept for an open
-- delivery (a dead letter, a pull peer's backlog).
CREATE INDEX events_content_kept_idx ON events (accepted_at) WHERE content <> '{}'::jsonb;

-- delivery_attempts: by start time (there was no index but the key).
CREATE INDEX delivery_attempts_started_idx ON delivery_attempts (started_at);

-- The sweep keeps the content of a message whose content.expires is still
-- to come (the expiry sweep needs it).  Without statistics on
-- event_expires(content) the planner guesses that almost every event has
-- one (its default for an expression), expects few rows, and reads every
-- old event with content, then sorts them, instead of stopping at the
-- batch's end: the first runs after this migration read the whole backlog
-- once per batch (140,000 events for a batch of 1000 in the test of
-- docs/schema.md, "Retention").  ANALYZE fills the statistics now rather
-- than at autovacuum's next turn.
CREATE STATISTICS events_expires_stats ON (event_expires(content)) FROM events;
ANALYZE events;
