-- 048_retention_media_trimmed.sql: two fixes of the retention sweep
-- (gateway/retention.c; docs/operations.md, "Retention"): the removal of
-- the records of re-hosted files no message's content took with it
-- (media_sql), and the erasure's index, which held the events whose
-- content it had trimmed (content_sql).
--
-- A record of media_rehosted goes with the content of the messages that
-- name its URL (RETENTION_FORGET_FILES), but one the Matrix adapter's
-- media worker wrote after that content went (the message expired, or
-- the policy dropped it, while its file was being fetched), and those of
-- messages whose content went before the forty-fifth session, were named
-- by none and kept for ever.  The sweep now deletes every record made
-- more than retention.content_days or rows_days ago, whichever is
-- sooner, oldest first, a batch at a time, by this index.  Its cost:
-- one entry per file re-hosted, written once.
CREATE INDEX IF NOT EXISTS media_rehosted_created_idx ON media_rehosted (created_at);

-- The retention sweep trims an old event's content to what it keeps
-- (gateway/retention.c, KEPT_CONTENT: a message that expires keeps its
-- type, sender and content.expires; a reaction its type and first part's
-- type and body, from which XMPP's whole sets of reactions are made), and
-- a trimmed event stayed in events_content_kept_idx (025, content <>
-- '{}'): each run walked every old reaction ever trimmed (with rows_days
-- 0, the default, all of them, for ever) to find none due, computing
-- each one's kept content: 300,000 old reactions took 4.7-4.9 s a run,
-- once a minute, growing with the table (until the forty-eighth
-- session's review).  The sweep now marks what it trimmed (a constant
-- default: no rewrite, nothing on the insert path), and the index splits
-- in two: the events whose content is still to be erased or trimmed
-- (events_content_due_idx, read by the erasure and the deletion of
-- events) and the trimmed ones (events_content_trimmed_idx, read by the
-- deletion alone, as far as retention.rows_days).  The events trimmed
-- before this migration are not marked: the sweep reads each once more
-- and marks it (the first runs after the upgrade count them as erased).
ALTER TABLE events ADD COLUMN content_trimmed boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN events.content_trimmed IS 'Its content trimmed by the retention sweep to what it keeps (a reaction''s emoji, an expiring message''s expiry).';

-- Their cost on the insert path is that of the index they replace: one
-- entry per event (in the first).  The builds read the whole table and
-- block the writers of events while they run; on a large table add the
-- column and build both first with CREATE INDEX CONCURRENTLY under these
-- names (docs/operations.md), and this file then only drops the old
-- index.
CREATE INDEX IF NOT EXISTS events_content_due_idx ON events (accepted_at)
    WHERE content <> '{}'::jsonb AND NOT content_trimmed;
CREATE INDEX IF NOT EXISTS events_content_trimmed_idx ON events (accepted_at)
    WHERE content <> '{}'::jsonb AND content_trimmed;
DROP INDEX IF EXISTS events_content_kept_idx;
