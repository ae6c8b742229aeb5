-- 035_expired_events.sql: a message that expired stays known as expired.
--
-- The expiry sweep (gateway/policy_live.c) deletes an expired message's
-- content, and content '{}' was all that was left of it: the same as a
-- message whose content the retention sweep erased, or a denied one.  An
-- edit sent after the expiry (a late client, a clock behind) was then
-- taken as an edit of any message: delivered (to Matrix as an m.replace
-- with the new text) and its text kept until retention.content_days.  The
-- sweep now marks what it expires, and the peer API expires an edit of a
-- marked message (or of one whose time has come) as it comes: its rows
-- expired, its content not kept.  A constant default: the column costs no
-- rewrite here and nothing on the insert path.  Messages expired before
-- this migration are not marked (their content alone does not say it).
ALTER TABLE events ADD COLUMN expired boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN events.expired IS 'Taken back at its content.expires by the expiry sweep (its content deleted).';
